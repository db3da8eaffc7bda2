"""Representation drift: how much fine-tuning changed what the backbone computes on robot frames.

`backbone_shift` (run.py) says how far the weights moved; two backbones can move as far and change their
features very differently (co-training keeps what the backbone computes). Here both backbones, the
pretrained VLM's and the fine-tuned one, read the same held-out demonstration frames with their task
prompts, and their features are compared with linear CKA (Kornblith et al. 2019: 1 = the same up to a
rotation and scale, 0 = unrelated), over every valid prefix token (image patches and prompt):

- `hidden`: the backbone's last hidden states (B * Lp valid tokens, D), what the LM head reads;
- `kv`: per layer, the keys and values the action expert attends to (what stop-gradient insulates the
  backbone from shaping), CKA averaged over layers.

Drift is reported as 1 - CKA. The pretrained backbone is the fine-tuned checkpoint with the VLM's weights
put back by the importer lerobot-train used, so that both read identical inputs through one preprocessor.

    python examples/ki_ablation/drift.py --output-dir outputs/ki_ablation   # every finished run lacking one
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "metaworld"))

FILE = "drift.json"  # per run: runs/<arm>/seed<k>/drift.json


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature sets over the same N samples: x (N, Dx), y (N, Dy)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    cka = float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))
    return min(cka, 1.0)  # <= 1 (Cauchy-Schwarz); identical features give 1 + rounding


@torch.no_grad()
def prefix_features(policy, pre, batch: dict) -> tuple[Tensor, list[Tensor]]:
    """Valid prefix tokens' last hidden states (N, D) and, per layer, their keys and values (N, 2*KVH*hd)."""
    from lerobot_ki.model_inputs import robot_inputs

    policy.eval()
    inputs = robot_inputs(pre(batch), policy.config)
    embs, pad = policy.model.embed_prefix(inputs)  # (B, Lp, D), (B, Lp)
    hidden, kv = policy.model.prefill(embs, pad)  # (B, Lp, D); per layer (B, KVH, Lp, hd) each
    per_layer = [torch.cat([k, v], dim=1).transpose(1, 2).flatten(2)[pad] for k, v in kv]  # (N, 2*KVH*hd)
    return hidden[pad], per_layer


def pretrained_backbone_state(vlm: Path, policy) -> dict[str, Tensor]:
    """The pretrained VLM's weights under `policy`'s ki_vla names (the importer lerobot-train used): the
    backbone before fine-tuning, for `backbone_shift` (run.py) and the drift below."""
    from safetensors.torch import load_file

    from lerobot_ki.weights import paligemma_to_ki_state_dict

    hf = {}
    for f in sorted(vlm.glob("*.safetensors")):
        hf.update(load_file(f))
    start, _ = paligemma_to_ki_state_dict(hf, policy, policy.config)
    return start


def representation_drift(
    checkpoint: Path, vlm: Path, heldout_root: Path, repo_id: str, device: str = "cpu"
) -> dict[str, float]:
    """1 - linear CKA between the pretrained VLM's and the fine-tuned backbone's features on the held-out
    frames that the chunk error uses (`evaluate.heldout_frames`): {"hidden", "kv", "kv_per_layer"}."""
    from evaluate import heldout_frames, load_policy

    policy, pre, _ = load_policy(checkpoint, device)
    batch, _, _ = heldout_frames(heldout_root, repo_id, policy.config.chunk_size)
    tuned_hidden, tuned_kv = prefix_features(policy, pre, batch)
    # The backbone as before fine-tuning; the expert is unused.
    policy.load_state_dict(pretrained_backbone_state(vlm, policy), strict=False)
    base_hidden, base_kv = prefix_features(policy, pre, batch)
    kv = [1.0 - linear_cka(a, b) for a, b in zip(base_kv, tuned_kv, strict=True)]
    hidden = 1.0 - linear_cka(base_hidden, tuned_hidden)
    return {"hidden": hidden, "kv": sum(kv) / len(kv), "kv_per_layer": kv}


def write_drift(
    run_dir: Path, checkpoint: Path, vlm: Path, out: Path, repo_id: str, device: str = "cpu"
) -> dict[str, float]:
    """The run's drift.json (computed once; an existing one is read, never rewritten)."""
    path = run_dir / FILE
    if not path.exists():
        drift = representation_drift(checkpoint, vlm, out / "data" / "heldout", f"{repo_id}_heldout", device)
        path.write_text(json.dumps(drift, indent=1))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    from run import DEFAULT_VLM, REPO_ID, finished_runs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/ki_ablation"))
    p.add_argument("--vlm", type=Path, default=DEFAULT_VLM, help="the pretrained VLM the runs started from")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = args.output_dir.resolve()
    for run_dir, arm, ckpt in finished_runs(out):
        if not arm.is_ki_vla or not arm.pretrained_backbone:
            continue  # drift from the pretrained VLM means nothing for other policies or a random start
        drift = write_drift(run_dir, ckpt, args.vlm.resolve(), out, REPO_ID, args.device)
        name = f"{run_dir.parent.name} {run_dir.name}"
        print(f"{name}: drift hidden {drift['hidden']:.4f}, K/V {drift['kv']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
