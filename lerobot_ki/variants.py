"""Sizes of the backbone, the action expert and the vision tower for each named preset.

The real sizes match openpi / LeRobot pi05 so that `lerobot/pi05_base` loads unchanged; `tiny` keeps the
same structure (shared head_dim and KV heads, equal depth) at a size a 2-core CPU trains in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmaSize:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class SiglipSize:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int


GEMMA_2B = GemmaSize(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaSize(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
# Expert and backbone must agree on depth, KV heads and head_dim: the expert attends to backbone K/V.
TINY_BACKBONE = GemmaSize(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32)
TINY_EXPERT = GemmaSize(width=64, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32)

SIGLIP_SO400M = SiglipSize(
    hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=14
)
TINY_SIGLIP = SiglipSize(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=4, patch_size=16)

BACKBONE_VARIANTS = {"gemma_2b": GEMMA_2B, "gemma_300m": GEMMA_300M, "tiny": TINY_BACKBONE}
EXPERT_VARIANTS = {"gemma_300m": GEMMA_300M, "tiny": TINY_EXPERT}
VISION_VARIANTS = {"gemma_2b": SIGLIP_SO400M, "gemma_300m": SIGLIP_SO400M, "tiny": TINY_SIGLIP}
