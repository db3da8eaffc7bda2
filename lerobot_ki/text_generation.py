"""Reading the backbone's answers: `generate_text` over a `KIModel`, and `token_picker`, which chooses
the next text token from the logits (greedy, or sampled with temperature, top-k and top-p through
transformers' logits warpers), FAST action tokens never chosen for text."""

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

from lerobot_ki.model_inputs import vlm_inputs
from lerobot_ki.text_tokenizer import TextTokenizer
from lerobot_ki.vla_model import KIModel
from lerobot_ki.vlm_cotraining import collate, tokenize_example
from lerobot_ki.vlm_data import image_to_tensor


@torch.no_grad()
def generate_text(
    model: KIModel,
    tokenizer: TextTokenizer,
    images,
    prompt: str | list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The backbone's answers to `prompt` about `images`, one string per example.

    images: a (B, 3, H, W) or (3, H, W) tensor in [0, 1] (one camera), or a list of those (one per
    camera, up to the model's number of cameras; the rest are masked out), or a list of PIL images
    (one example). temperature 0 is greedy; otherwise sampling with top-k / top-p (0 / 1 = off),
    reproducible with `generator`. Stops at EOS or after `max_new_tokens`. `tokenizer`: the checkpoint's
    (`processor_ki.text_tokenizer_of(preprocessor)`) or `load_text_tokenizer(config.text_tokenizer, ...)`."""
    config, layout = model.config, model.layout
    per_example = _images_per_example(images)
    prompts = [prompt] * len(per_example) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(per_example):
        raise ValueError(f"{len(prompts)} prompts for {len(per_example)} examples.")
    n_cameras = len(config.image_features)
    examples = [
        tokenize_example(imgs, p, None, tokenizer, config.tokenizer_max_length, 1, n_cameras)
        for imgs, p in zip(per_example, prompts, strict=True)
    ]
    batch = collate(examples, layout.pad_id)
    device = model.action_in_proj.weight.device
    was_training = model.training
    model.eval()
    try:
        inputs = vlm_inputs(batch.images, batch.prompt_ids, batch.prompt_mask, config, device)
        pick = token_picker(layout.fast_lm_range(), temperature, top_k, top_p, generator)
        ids = model.generate(inputs, max_new_tokens, layout.eos_id, pick=pick)
    finally:
        model.train(was_training)
    texts = []
    for row in ids.tolist():
        row = row[: row.index(layout.eos_id)] if layout.eos_id in row else row
        texts.append(tokenizer.decode(row))
    return texts


def _images_per_example(images) -> list[list[Tensor]]:
    """generate_text's image argument -> per example, its camera images (3, H, W) in [0, 1]."""
    if isinstance(images, Tensor):
        images = [images]
    images = list(images)
    if images and not isinstance(images[0], Tensor):  # PIL images / arrays of a single example
        return [[image_to_tensor(i) for i in images]]
    if all(i.ndim == 3 for i in images):  # one example, one tensor per camera
        return [images]
    if not all(i.ndim == 4 for i in images) or len({i.shape[0] for i in images}) != 1:
        raise ValueError(
            "images must be (B, 3, H, W) / (3, H, W) tensors, a list of them (one per camera, same B), "
            f"or PIL images; got shapes {[tuple(i.shape) for i in images]}"
        )
    return [[cam[b] for cam in images] for b in range(images[0].shape[0])]


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
