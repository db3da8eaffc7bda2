"""What the ki_vla policy adds for text: the VLM co-training step (README "VLM co-training") and
`generate_text`, reading the backbone's answers. Mixed into `KIPolicy`; uses its config, model, vocabulary
layout and image preprocessing."""

from __future__ import annotations

import torch
from torch import Tensor

from lerobot_ki.text_generation import token_picker
from lerobot_ki.text_tokenizer import TextTokenizer, load_text_tokenizer
from lerobot_ki.vlm_cotraining import VLMBatch, collate, tokenize_example
from lerobot_ki.vlm_data import image_to_tensor


class VLMPolicyMixin:
    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The backbone's text tokenizer, for co-training and `generate_text`: the processor's when handed
        over with `set_text_tokenizer` (a checkpoint's saved one), else built from the config exactly as
        the processor builds it (`byte` needs no file)."""
        if self._text_tokenizer is None:
            self._text_tokenizer = load_text_tokenizer(
                self.config.text_tokenizer, self.config.fast_vocab_size
            )
        return self._text_tokenizer

    def set_text_tokenizer(self, tokenizer: TextTokenizer) -> None:
        self._text_tokenizer = tokenizer

    def _cotrain(self, robot_batch: int) -> tuple[Tensor | None, dict[str, float]]:
        """Draws this step's VLM examples (as many as keep the mix at vlm_mix_ratio) and their loss."""
        examples = self.vlm_cotraining.draw(robot_batch, self.text_tokenizer)
        info = {
            "vlm_ratio": self.vlm_cotraining.achieved_ratio(),  # cumulative over the run, resumes included
            "vlm_bad_records": float(self.vlm_cotraining.counts()["records_bad"]),
        }
        if not examples:
            return None, info
        loss, vlm_info = self.vlm_loss(collate(examples, self.layout.pad_id))
        return loss, {**info, **vlm_info}

    def vlm_loss(self, batch: VLMBatch) -> tuple[Tensor, dict[str, float]]:
        """Next-token CE of the backbone on the target text of VLM examples: no expert, no flow, no FAST."""
        prefix_embs, prefix_pad = self._vlm_prefix(batch.images, batch.prompt_ids, batch.prompt_mask)
        device = prefix_embs.device
        _, _, loss, acc = self.model.next_token_ce(
            prefix_embs, prefix_pad, batch.target_ids.to(device), batch.target_mask.to(device)
        )
        return loss, {"vlm_loss": float(loss.detach()), "vlm_token_acc": float(acc)}

    def _vlm_prefix(
        self, images: list[list[Tensor]], prompt_ids: Tensor, prompt_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Prefix (B, Lp, D) and its mask for VLM examples: example b's images fill the first cameras,
        resized and scaled like robot frames; cameras it lacks are masked out (pi05's img_masks), so no
        token attends to them. No state: a VLM example has no robot."""
        device = self.model.action_in_proj.weight.device
        blank = torch.zeros(3, *self.config.image_resolution, device=device)
        cameras, masks = [], []
        for c, key in enumerate(self.config.image_features):
            per_example = [
                self._model_image(key, ex[c][None].to(device))[0] if c < len(ex) else blank for ex in images
            ]
            cameras.append(torch.stack(per_example))  # (B, 3, R, R)
            masks.append(torch.tensor([c < len(ex) for ex in images], dtype=torch.bool, device=device))
        embs, pad, _ = self.model.embed_prefix(cameras, masks, prompt_ids.to(device), prompt_mask.to(device))
        return embs, pad

    @torch.no_grad()
    def generate_text(
        self,
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
        reproducible with `generator`. Stops at EOS or after `max_new_tokens`."""
        per_example = _images_per_example(images)
        prompts = [prompt] * len(per_example) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(per_example):
            raise ValueError(f"{len(prompts)} prompts for {len(per_example)} examples.")
        tok = self.text_tokenizer
        examples = [
            tokenize_example(
                imgs, p, None, tok, self.config.tokenizer_max_length, 1, len(self.config.image_features)
            )
            for imgs, p in zip(per_example, prompts, strict=True)
        ]
        batch = collate(examples, self.layout.pad_id)
        was_training = self.training
        self.eval()
        try:
            prefix_embs, prefix_pad = self._vlm_prefix(batch.images, batch.prompt_ids, batch.prompt_mask)
            ids = self.model.generate(
                prefix_embs,
                prefix_pad,
                max_new_tokens,
                self.layout.eos_id,
                pick=token_picker(self.layout.fast_lm_range(), temperature, top_k, top_p, generator),
            )
        finally:
            self.train(was_training)
        texts = []
        for row in ids.tolist():
            row = row[: row.index(self.layout.eos_id)] if self.layout.eos_id in row else row
            texts.append(tok.decode(row))
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
