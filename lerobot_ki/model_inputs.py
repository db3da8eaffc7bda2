"""`ModelInputs`: what the model reads for one batch (openpi's `Observation`), and how a LeRobot batch or a
batch of VLM examples becomes one. Everything the model needs is here, checked and shaped; the model
itself never sees LeRobot's dict keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lerobot.policies.common.vla_utils import pad_vector, resize_with_pad_torch
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from torch import Tensor

from lerobot_ki.configuration_ki import EMPTY_CAMERA, KIConfig

PROMPT_LENGTH_MULTIPLE = 16


@dataclass
class ModelInputs:
    images: list[Tensor]  # per camera (B, 3, R, R) in [-1, 1]
    image_masks: list[Tensor]  # per camera (B,) bool: False = absent, its tokens are padding
    prompt_ids: Tensor  # (B, L) right-padded
    prompt_mask: Tensor  # (B, L) bool
    state: Tensor  # (B, max_state_dim) read as a state token (state_mode=continuous), else (B, 0)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]


def model_image(key: str, img: Tensor, resolution: tuple[int, int]) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, R, R) in [-1, 1]: resized with padding as SigLIP expects."""
    img = img.float()
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"'{key}' must be (B, 3, H, W) in [0, 1], got shape {tuple(img.shape)}")
    if not torch.isfinite(img).all():
        raise ValueError(f"'{key}' contains NaN or Inf pixels.")
    if tuple(img.shape[-2:]) != tuple(resolution):
        img = resize_with_pad_torch(img, *resolution)
    return img * 2.0 - 1.0


def robot_inputs(batch: dict[str, Tensor], config: KIConfig) -> ModelInputs:
    """A preprocessed LeRobot batch -> checked images and masks per camera, the prompt without its
    all-padding tail, and the state for state_mode=continuous."""
    if OBS_LANGUAGE_TOKENS not in batch:
        raise ValueError(
            "The batch has no prompt tokens: run it through the ki_vla preprocessor "
            "(make_pre_post_processors / the policy_preprocessor saved with the checkpoint)."
        )
    images, masks = _robot_images(batch, config)
    tokens, prompt_mask = trim_prompt_padding(batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK])
    if config.state_mode == "continuous":
        state = pad_vector(batch[OBS_STATE], config.max_state_dim)
    else:
        state = tokens.new_zeros(tokens.shape[0], 0, dtype=torch.float32)
    return ModelInputs(images, masks, tokens, prompt_mask, state)


def _robot_images(batch: dict[str, Tensor], config: KIConfig) -> tuple[list[Tensor], list[Tensor]]:
    present = [k for k in config.image_features if k in batch]
    missing = [k for k in config.image_features if k not in batch and EMPTY_CAMERA not in k]
    if missing or not present:
        raise ValueError(
            f"Camera(s) {missing or list(config.image_features)} missing from the observation "
            f"(it has {sorted(k for k in batch if k.startswith('observation.'))}). Map your camera names "
            "with --rename_map, or declare absent cameras with --policy.empty_cameras."
        )
    images, masks = [], []
    for key in config.image_features:
        if key not in batch:  # a declared empty camera: black (-1) and masked out
            images.append(torch.full_like(images[0], -1.0))
            masks.append(torch.zeros_like(masks[0]))
            continue
        img = model_image(key, batch[key], config.image_resolution)
        images.append(img)
        masks.append(torch.ones(img.shape[0], dtype=torch.bool, device=img.device))
    return images, masks


def vlm_inputs(
    images: list[list[Tensor]], prompt_ids: Tensor, prompt_mask: Tensor, config: KIConfig, device
) -> ModelInputs:
    """VLM examples -> model inputs: example b's images (3, H, W) in [0, 1] fill the first cameras, resized
    and scaled like robot frames; cameras it lacks are masked out (pi05's img_masks), so no token attends
    to them. No state: a VLM example has no robot."""
    blank = torch.zeros(3, *config.image_resolution, device=device)
    cameras, masks = [], []
    for c, key in enumerate(config.image_features):
        per_example = [
            model_image(key, ex[c][None].to(device), config.image_resolution)[0] if c < len(ex) else blank
            for ex in images
        ]
        cameras.append(torch.stack(per_example))  # (B, 3, R, R)
        masks.append(torch.tensor([c < len(ex) for ex in images], dtype=torch.bool, device=device))
    no_state = torch.zeros(len(images), 0, device=device)
    return ModelInputs(cameras, masks, prompt_ids.to(device), prompt_mask.to(device).bool(), no_state)


def trim_prompt_padding(tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Drops the prompt columns after the last valid token of the batch (LeRobot's processors pad every
    prompt to tokenizer_max_length: 200 positions for a prompt of ~30 tokens). Padding is masked out, so
    the result is unchanged; the prefill and every training step just skip it. The kept length is
    rounded up to a multiple of PROMPT_LENGTH_MULTIPLE so that CUDA graphs see few distinct shapes."""
    masks = masks.bool()
    valid_cols = masks.any(dim=0).nonzero()
    keep = int(valid_cols.max()) + 1 if valid_cols.numel() else 1  # one host sync per call
    keep = min(tokens.shape[1], -(-keep // PROMPT_LENGTH_MULTIPLE) * PROMPT_LENGTH_MULTIPLE)
    return tokens[:, :keep], masks[:, :keep]
