"""Choosing the next text token from the backbone's logits: greedy, or sampled with temperature, top-k
and top-p (transformers' logits warpers), with FAST action tokens never chosen for text."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def token_picker(
    banned: tuple[int, int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """logits (B, V) -> next ids (B,). `temperature=0` is greedy; ids in [banned[0], banned[1]) (the FAST
    range) are excluded. `generator` makes sampling reproducible (same seed, same text)."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"Need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}."
        )
    warpers = LogitsProcessorList()
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    def pick(logits: Tensor) -> Tensor:
        logits = logits.float().clone()
        logits[:, banned[0] : banned[1]] = float("-inf")
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(warpers(None, logits), dim=-1)  # the warpers ignore input_ids
        gen_device = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(-1).to(logits.device)

    return pick
