"""Same weights in LeRobot's PI05Policy and in ki_vla -> same actions? Not a test (about 2 min and 12 GB on a
CPU): it prints the largest difference between the two policies' flow-matching action chunks.

LeRobot's pi05 only builds at full size, so its `get_gemma_config` is swapped for two-layer variants of the
real widths (backbone 2048, head_dim 256, one KV head); the SigLIP So400m tower and the 257152-token
vocabulary stay real. Every weight is random (norms and adaRMS included, so each one matters), moved into
ki_vla with `pi05_to_ki_state_dict`, and both sample with the same noise on a batch with a padded prompt.

    HF_HUB_OFFLINE=1 python benchmarks/pi05_equivalence.py
"""

from __future__ import annotations

import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi05 import modeling_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

from lerobot_ki import variants
from lerobot_ki.configuration_ki import PALIGEMMA_TOKENIZER, KIConfig
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.weights import pi05_to_ki_state_dict

BACKBONE = variants.GemmaSize(width=2048, depth=2, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=256)
EXPERT = variants.GemmaSize(width=256, depth=2, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=256)
SIZES = {"small_backbone": BACKBONE, "small_expert": EXPERT}
RES, CHUNK, BSZ, PROMPT = 28, 8, 2, 12


def _features(cfg):
    cfg.input_features = {
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, RES, RES)),
        OBS_STATE: PolicyFeature(FeatureType.STATE, (6,)),
    }
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (7,))}
    return cfg


def main() -> None:
    modeling_pi05.get_gemma_config = lambda name: modeling_pi05.GemmaConfig(**vars(SIZES[name]))
    variants.BACKBONE_VARIANTS["small_backbone"] = BACKBONE
    variants.VISION_VARIANTS["small_backbone"] = variants.SIGLIP_SO400M
    variants.EXPERT_VARIANTS["small_expert"] = EXPERT
    sizes = dict(image_resolution=(RES, RES), chunk_size=CHUNK, n_action_steps=CHUNK, device="cpu")

    pcfg = _features(PI05Config(**sizes))  # validated with pi05's variant names, then switched
    pcfg.paligemma_variant, pcfg.action_expert_variant = "small_backbone", "small_expert"
    torch.manual_seed(0)
    pi05 = modeling_pi05.PI05Policy(pcfg).eval()
    with torch.no_grad():
        for p in pi05.parameters():
            p.normal_(0, 0.02)
    ki = KIPolicy(
        _features(
            KIConfig(
                paligemma_variant="small_backbone",
                action_expert_variant="small_expert",
                text_tokenizer=PALIGEMMA_TOKENIZER,  # the PaliGemma vocabulary; the file is never read
                **sizes,
            )
        )
    ).eval()
    mapped, report = pi05_to_ki_state_dict(pi05.state_dict(), ki, ki.config)
    ki.load_state_dict(mapped, strict=False)  # fast_token_placement keeps its default
    print(report.summary())

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 257_000, (BSZ, PROMPT), generator=g)
    mask = torch.ones(BSZ, PROMPT, dtype=torch.bool)
    ids[:, 0], ids[1, 8:], mask[1, 8:] = 2, 0, False  # <bos>; the second prompt is right-padded
    batch = {
        "observation.images.top": torch.rand(BSZ, 3, RES, RES, generator=g),
        OBS_STATE: torch.rand(BSZ, 6, generator=g),
        OBS_LANGUAGE_TOKENS: ids,
        OBS_LANGUAGE_ATTENTION_MASK: mask,
    }
    noise = torch.randn(BSZ, CHUNK, 32, generator=g)
    with torch.no_grad():
        a = pi05.predict_action_chunk(batch, noise=noise.clone())
        b = ki.predict_action_chunk(batch, noise=noise.clone())
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    print(f"max |pi05 - ki_vla| = {diff:.3g} (actions up to {scale:.3g})")


if __name__ == "__main__":
    main()
