"""Tiny preset on CPU: a training step (forward + backward + AdamW, batch 8, two 96 px cameras, chunks of
50) and one action chunk (prefill + 10 Euler steps, batch 8), medians of 20 after 3 warm-up calls. Uses
only the public API, so the same file times another checkout: `PYTHONPATH=<checkout> python
benchmarks/tiny_step_timing.py` (run checkouts interleaved so machine load affects them alike)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from lerobot.configs import FeatureType, PolicyFeature

import lerobot_ki
from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.modeling_ki import KIPolicy

CAMERAS = ("observation.images.top", "observation.images.wrist")
BATCH, RES, CHUNK, PROMPT, VALID, FAST, FAST_VALID = 8, 96, 50, 200, 48, 64, 20


def make_policy() -> KIPolicy:
    cfg = KIConfig(
        paligemma_variant="tiny",
        action_expert_variant="tiny",
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        image_resolution=(RES, RES),
        max_state_dim=8,
        max_action_dim=8,
        device="cpu",
    )
    cfg.input_features = {c: PolicyFeature(FeatureType.VISUAL, (3, RES, RES)) for c in CAMERAS}
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (4,))
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (4,))}
    return KIPolicy(cfg)


def make_batch() -> dict[str, torch.Tensor]:
    """A preprocessed batch made by hand: byte-tokenizer prompt ids, FAST ids in the byte layout."""
    g = torch.Generator().manual_seed(0)
    batch = {c: torch.rand(BATCH, 3, RES, RES, generator=g) for c in CAMERAS}
    batch["observation.state"] = torch.rand(BATCH, 4, generator=g) * 2 - 1
    mask = torch.zeros(BATCH, PROMPT, dtype=torch.bool)
    mask[:, :VALID] = True
    batch["observation.language.tokens"] = torch.randint(4, 260, (BATCH, PROMPT), generator=g)
    batch["observation.language.attention_mask"] = mask
    batch["action"] = torch.rand(BATCH, CHUNK, 4, generator=g) * 2 - 1
    fast_mask = torch.zeros(BATCH, FAST, dtype=torch.bool)
    fast_mask[:, :FAST_VALID] = True
    batch["action.tokens"] = torch.randint(260, 260 + 1024, (BATCH, FAST), generator=g)
    batch["action.token_mask"] = fast_mask
    return batch


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    policy, batch = make_policy(), make_batch()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def step() -> None:
        loss, _ = policy.forward(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    policy.train()
    train_ms = median_ms(step)
    policy.eval()
    chunk_ms = median_ms(torch.no_grad()(lambda: policy.predict_action_chunk(batch)))
    print(f"{lerobot_ki.__file__}: train step {train_ms:.1f} ms, chunk {chunk_ms:.1f} ms")


if __name__ == "__main__":
    main()
