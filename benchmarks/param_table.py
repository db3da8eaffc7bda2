"""Parameter counts of the real ki_vla preset (PaliGemma 3B backbone + Gemma 300M expert) next to LeRobot's
pi05, both built at full size on the meta device (no memory, no weights, no GPU). Prints a markdown table.

    HF_HUB_OFFLINE=1 python benchmarks/param_table.py
"""

from __future__ import annotations

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy
from torch import nn

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.modeling_ki import KIPolicy

PWE = "model.paligemma_with_expert."
# (row, parameter-name prefixes); a parameter counts in the first row that claims it.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("vision tower (SigLIP So400m)", (PWE + "paligemma.model.vision_tower.",)),
    ("multi-modal projector", (PWE + "paligemma.model.multi_modal_projector.",)),
    ("backbone token embedding", (PWE + "paligemma.model.language_model.embed_tokens.",)),
    ("backbone LM excl. embedding (Gemma 2B layers + norm)", (PWE + "paligemma.model.language_model.",)),
    ("backbone LM head (untied copy of the embedding)", (PWE + "paligemma.lm_head.",)),
    ("action expert (Gemma 300M layers + adaRMS norms)", (PWE + "gemma_expert.model.",)),
    ("action expert LM head", (PWE + "gemma_expert.lm_head.",)),
    ("action/time projections", ("model.action_", "model.time_mlp_", "model.state_proj.")),
]


def build_on_meta(policy_cls: type[nn.Module], config: PreTrainedConfig) -> nn.Module:
    config.device = "meta"  # after validation, which knows no 'meta': the final `.to(device)` is a no-op
    with torch.device("meta"):
        return policy_cls(config)


def count(policy: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys([name for name, _ in GROUPS] + ["other"], 0)
    for name, p in policy.named_parameters():  # shared parameters are yielded once
        row = next((row for row, prefixes in GROUPS if name.startswith(prefixes)), "other")
        counts[row] += p.numel()
    return counts


def main() -> None:
    ki = count(build_on_meta(KIPolicy, KIConfig(device="cpu")))
    pi05 = count(build_on_meta(PI05Policy, PI05Config(device="cpu")))
    emb = "backbone token embedding"
    rows = [(name, ki[name], pi05[name]) for name, _ in GROUPS]
    rows.insert(
        4, ("backbone LM incl. embedding", ki[emb] + ki[GROUPS[3][0]], pi05[emb] + pi05[GROUPS[3][0]])
    )
    if ki["other"] or pi05["other"]:
        rows.append(("other", ki["other"], pi05["other"]))
    rows.append(("**total**", sum(ki.values()), sum(pi05.values())))
    print("| component | ki_vla (gemma_2b + gemma_300m) | LeRobot pi05 |")
    print("|---|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:,} ({a / 1e9:.3f}B) | {b:,} ({b / 1e9:.3f}B) |")


if __name__ == "__main__":
    main()
