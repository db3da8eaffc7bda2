"""`KIPolicy`: the LeRobot glue around `KIModel` (batch checks, images, action queue, checkpoints)."""

from __future__ import annotations

import builtins
import json
import logging
from collections import deque
from pathlib import Path

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.common.vla_utils import pad_vector, resize_with_pad_torch
from lerobot.policies.pretrained import PreTrainedPolicy, T
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from lerobot.utils.constants import (
    ACTION,
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
)
from torch import Tensor

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.cuda_graphs import CUDAGraphCache
from lerobot_ki.fast import FASTDecodeError, FASTTokenizer
from lerobot_ki.fast_artifacts import fast_from_tensor, fast_to_tensor, resolve_fast_tokenizer
from lerobot_ki.model_ki import KIModel
from lerobot_ki.policy_vlm import VLMPolicyMixin
from lerobot_ki.text_tokenizer import TextTokenizer
from lerobot_ki.vlm_cotraining import STATE_KEY, VLMCoTraining
from lerobot_ki.vocabulary import VocabLayout, layout_with_placement, vocab_layout
from lerobot_ki.weights import (
    PI05_TYPE,
    checkpoint_file,
    ki_config_from_pi05,
    load_paligemma_backbone,
    load_pi05_weights,
)

logger = logging.getLogger(__name__)

EMPTY_CAMERA = "empty_camera_"
PLACEMENT_KEY = "fast_token_placement"  # (fast_offset, fast_sign) of the VocabLayout the weights use
PROMPT_LENGTH_MULTIPLE = 16


class KIPolicy(VLMPolicyMixin, PreTrainedPolicy):
    """Knowledge-insulated VLA (Driess et al. 2025) as a LeRobot policy: `--policy.type=ki_vla`."""

    config_class = KIConfig
    name = "ki_vla"
    # Decoder layers of the backbone, the expert and the vision tower: the units FSDP shards.
    _fsdp_wrap_modules = ["_PiGemmaDecoderLayerBase", "SiglipEncoderLayer"]
    _no_split_modules = _fsdp_wrap_modules

    def __init__(self, config: KIConfig, dataset_stats: dict | None = None, **kwargs):
        super().__init__(config)
        self._graphs: CUDAGraphCache | None = None
        config.validate_features()
        self.config = config
        layout = vocab_layout(config.text_tokenizer, config.fast_vocab_size)
        self.init_rtc_processor()
        self.model = KIModel(config, layout.vocab_size, rtc_processor=self.rtc_processor)
        # Where FAST ids sit in the vocabulary, saved with the weights they were trained with: checkpoints
        # from before FAST moved below PaliGemma's <loc> tokens reload with their own placement.
        self.register_buffer(PLACEMENT_KEY, torch.tensor(layout.placement, dtype=torch.long))
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        # The FAST tokenizer rides in model.safetensors; a checkpoint being loaded brings its own.
        fast = None if kwargs.get("_weights_follow") else resolve_fast_tokenizer(config, dataset_stats)
        blob = fast_to_tensor(fast) if fast is not None else torch.zeros(0, dtype=torch.uint8)
        self.register_buffer("fast_tokenizer_state", blob)
        self._fast = fast
        if config.paligemma_pretrained_path and not kwargs.get("_weights_follow"):
            logger.info(load_paligemma_backbone(self, config.paligemma_pretrained_path).summary())
        self.num_fast_decode_failures = 0
        # VLM co-training (README "VLM co-training"): the policy draws VLM examples at each training step.
        self.vlm_cotraining = (
            VLMCoTraining(config, len(config.image_features)) if config.vlm_dataset is not None else None
        )
        self._text_tokenizer: TextTokenizer | None = None
        self.model.to(config.device)
        self.reset()

    # --- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: builtins.type[T],
        pretrained_name_or_path: str | Path,
        *,
        config: PreTrainedConfig | None = None,
        strict: bool = True,
        **kwargs,
    ) -> T:
        saved_type = _saved_policy_type(pretrained_name_or_path, kwargs)
        if saved_type == PI05_TYPE:
            return cls._start_from_pi05(pretrained_name_or_path, config, kwargs)
        if saved_type is not None and saved_type != cls.name:
            raise ValueError(
                f"{pretrained_name_or_path} holds a '{saved_type}' policy, not '{cls.name}'. Load it with "
                f"--policy.type={saved_type} / --policy.path. ki_vla starts from pi05 checkpoints "
                "(--policy.pretrained_path) or PaliGemma (--policy.paligemma_pretrained_path): README, "
                "'Starting from real weights'."
            )
        kwargs.pop("_weights_follow", None)
        return super().from_pretrained(
            pretrained_name_or_path, config=config, strict=strict, _weights_follow=True, **kwargs
        )

    @classmethod
    def _start_from_pi05(cls, source: str | Path, config: KIConfig | None, kwargs: dict) -> KIPolicy:
        """A new ki_vla with a pi05 checkpoint's weights: same module tree, plus what KI adds (the FAST
        tokenizer, fitted on the dataset as for a fresh policy). `config` is the CLI's KIConfig
        (lerobot-train passes it, with pretrained_path = `source`); None derives one from pi05's config."""
        revision = kwargs.get("revision")
        if config is None:
            config = ki_config_from_pi05(source, revision)
        if config.paligemma_pretrained_path:
            raise ValueError(
                "A pi05 checkpoint already holds a PaliGemma backbone: drop "
                "--policy.paligemma_pretrained_path or --policy.pretrained_path."
            )
        if config.pretrained_path is not None and str(config.pretrained_path) == str(source):
            # lerobot-train loads the processors from pretrained_path, and a pi05 checkpoint's are pi05's
            # (no FAST step, no FAST tokenizer, a Hub tokenizer). Cleared, it builds ki_vla's from the
            # dataset instead. The source stays in `name_or_path` (PEFT's base model) and in the log.
            logger.info("pretrained_path cleared: ki_vla's processors are built from the dataset.")
            config.pretrained_path = None
        policy = cls(config, dataset_stats=kwargs.get("dataset_stats"))
        logger.info(load_pi05_weights(policy, source, revision=revision).summary())
        policy.name_or_path = str(source)
        policy.to(config.device)
        policy.eval()
        return policy

    def _validate_peft_config(self, peft_config) -> None:
        # Started from pi05, config.pretrained_path was cleared (see `_start_from_pi05`) yet the weights are
        # pretrained; LeRobot's check would call this training from scratch.
        if not self.config.pretrained_path and getattr(self, "name_or_path", None):
            return
        super()._validate_peft_config(peft_config)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Co-training counters: a checkpoint trained without co-training starts the stream at its
        # beginning; one trained with it loads fine into a policy that does not co-train.
        vlm_key = prefix + STATE_KEY
        if self.vlm_cotraining is None:
            state_dict.pop(vlm_key, None)
        elif vlm_key not in state_dict:
            state_dict[vlm_key] = self.vlm_cotraining.state.clone()
        if prefix + PLACEMENT_KEY not in state_dict:  # written before the placement was recorded
            legacy = vocab_layout(self.config.text_tokenizer, self.config.fast_vocab_size, legacy=True)
            state_dict[prefix + PLACEMENT_KEY] = torch.tensor(legacy.placement, dtype=torch.long)
        # The FAST tokenizer blob has the size of the saved tokenizer, not of the empty placeholder.
        key = prefix + "fast_tokenizer_state"
        if key in state_dict:
            self.fast_tokenizer_state = torch.empty_like(
                state_dict[key], device=self.fast_tokenizer_state.device
            )
            self._fast = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def layout(self) -> VocabLayout:
        """The vocabulary layout: the config's, with the FAST placement these weights were trained with."""
        layout = vocab_layout(self.config.text_tokenizer, self.config.fast_vocab_size)
        placement = self.fast_token_placement.tolist()
        return layout_with_placement(layout, (placement[0], placement[1]))

    @property
    def fast_tokenizer(self) -> FASTTokenizer | None:
        if self._fast is None and self.fast_tokenizer_state.numel() > 0:
            self._fast = fast_from_tensor(self.fast_tokenizer_state)
        return self._fast

    def get_optim_params(self):
        return self.parameters()

    def _get_default_peft_targets(self) -> dict:
        projections = "state_proj|action_in_proj|action_out_proj|time_mlp_in|time_mlp_out"
        return {
            "target_modules": rf"(.*\.gemma_expert\..*\.self_attn\.(q|v)_proj|model\.({projections}))",
            "modules_to_save": [],
        }

    # --- real-time chunking -------------------------------------------------------------------------
    def supports_rtc(self) -> bool:
        # RTC guides the Euler steps of a flow sampler toward the committed actions; FAST decoding has no
        # such steps. LeRobot's rollout then refuses `--inference.type=rtc` with a generic line, so say why.
        if self.config.inference_mode != "flow":
            logger.warning(
                "ki_vla with inference_mode=%s does not support Real-Time Chunking (RTC guides the flow "
                "sampler): use --policy.inference_mode=flow with --inference.type=rtc, "
                "or --inference.type=sync.",
                self.config.inference_mode,
            )
            return False
        return True

    def init_rtc_processor(self) -> None:
        self.rtc_processor = (
            RTCProcessor(self.config.rtc_config) if self.config.rtc_config is not None else None
        )
        if getattr(self, "model", None) is not None:
            self.model.rtc_processor = self.rtc_processor

    def _rtc_enabled(self) -> bool:
        return self.config.rtc_config is not None and self.config.rtc_config.enabled

    # --- inputs -------------------------------------------------------------------------------------
    def _preprocess_images(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(B, C, H, W) in [0, 1] -> resized with padding, in [-1, 1] as SigLIP expects, plus masks."""
        present = [k for k in self.config.image_features if k in batch]
        missing = [k for k in self.config.image_features if k not in batch and EMPTY_CAMERA not in k]
        if missing or not present:
            raise ValueError(
                f"Camera(s) {missing or list(self.config.image_features)} missing from the observation "
                f"(it has {sorted(k for k in batch if k.startswith('observation.'))}). Map your camera names "
                "with --rename_map, or declare absent cameras with --policy.empty_cameras."
            )
        images, masks = [], []
        for key in self.config.image_features:
            if key not in batch:  # a declared empty camera: black (-1) and masked out
                images.append(torch.full_like(images[0], -1.0))
                masks.append(torch.zeros_like(masks[0]))
                continue
            img = self._model_image(key, batch[key])
            images.append(img)
            masks.append(torch.ones(img.shape[0], dtype=torch.bool, device=img.device))
        return images, masks

    def _model_image(self, key: str, img: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, R, R) in [-1, 1]: resized with padding as SigLIP expects."""
        img = img.float()
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"'{key}' must be (B, 3, H, W) in [0, 1], got shape {tuple(img.shape)}")
        if not torch.isfinite(img).all():
            raise ValueError(f"'{key}' contains NaN or Inf pixels.")
        if tuple(img.shape[-2:]) != tuple(self.config.image_resolution):
            img = resize_with_pad_torch(img, *self.config.image_resolution)
        return img * 2.0 - 1.0

    def _model_inputs(
        self, batch: dict[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
        """Checked images and masks per camera, the prompt without its all-padding tail, and the state
        (B, max_state_dim) for state_mode=continuous, else an empty (B, 0) tensor."""
        if OBS_LANGUAGE_TOKENS not in batch:
            raise ValueError(
                "The batch has no prompt tokens: run it through the ki_vla preprocessor "
                "(make_pre_post_processors / the policy_preprocessor saved with the checkpoint)."
            )
        images, img_masks = self._preprocess_images(batch)
        tokens, masks = trim_prompt_padding(batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK])
        if self.config.state_mode == "continuous":
            state = pad_vector(batch[OBS_STATE], self.config.max_state_dim)
        else:
            state = tokens.new_zeros(tokens.shape[0], 0, dtype=torch.float32)
        return images, img_masks, tokens, masks, state

    def _prefix(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        images, img_masks, tokens, masks, state = self._model_inputs(batch)
        return self.model.embed_prefix_with_state(images, img_masks, tokens, masks, state)

    def _check_actions(self, batch: dict[str, Tensor]) -> Tensor:
        actions = batch[ACTION]
        if actions.ndim != 3:
            raise ValueError(f"Expected an action chunk (B, T, A), got {tuple(actions.shape)}.")
        if actions.shape[-1] > self.config.max_action_dim:
            raise ValueError(
                f"The action has {actions.shape[-1]} dims but max_action_dim={self.config.max_action_dim}: "
                f"pass --policy.max_action_dim={actions.shape[-1]}."
            )
        if not torch.isfinite(actions).all():
            raise ValueError("The action chunk contains NaN or Inf: check the dataset's actions.")
        if ACTION_TOKENS not in batch:
            raise ValueError("The batch has no FAST tokens: run it through the ki_vla preprocessor.")
        return actions

    # --- training -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        if reduction != "mean":
            raise ValueError("ki_vla returns a batch-mean loss only; per-sample weighting is not supported.")
        actions = self._check_actions(batch)
        bsz, horizon, action_dim = actions.shape
        step_ok = ~batch.get(
            f"{ACTION}_is_pad", torch.zeros(bsz, horizon, dtype=torch.bool, device=actions.device)
        )
        dim_ok = torch.arange(self.config.max_action_dim, device=actions.device) < action_dim
        flow_mask = step_ok[:, :, None] & dim_ok[None, None, :]  # (B, T, A_max): padding is excluded
        prefix_embs, prefix_pad = self._prefix(batch)
        out = self.model(
            prefix_embs,
            prefix_pad,
            batch[ACTION_TOKENS],
            batch[ACTION_TOKEN_MASK].bool(),
            pad_vector(actions, self.config.max_action_dim),
            flow_mask,
        )
        loss = (
            self.config.fast_loss_weight * out["loss_fast_ce"]
            + self.config.flow_loss_weight * out["loss_flow"]
        )
        info = {k: float(v.detach()) for k, v in out.items()}
        if self.vlm_cotraining is not None and self.training:  # evaluation batches draw no VLM examples
            vlm_loss, vlm_info = self._cotrain(bsz)
            if vlm_loss is not None:
                loss = loss + self.config.vlm_loss_weight * vlm_loss
            info.update(vlm_info)
        info["loss"] = float(loss.detach())
        return loss, info

    # --- inference ----------------------------------------------------------------------------------
    def reset(self) -> None:
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor]) -> Tensor:
        if self._rtc_enabled():
            raise RuntimeError("With RTC enabled, call predict_action_chunk (lerobot-rollout does).")
        self.eval()
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]  # (B, n, A)
            self._action_queue.extend(chunk.transpose(0, 1))
        return self._action_queue.popleft()

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """Normalized actions (B, chunk_size, action_dim)."""
        if self.training:
            self.eval()
        if self.config.inference_mode == "fast":
            if self._rtc_enabled():
                raise ValueError(
                    "RTC guides a flow sampler; inference_mode=fast decodes tokens. Use "
                    "--policy.inference_mode=flow with --inference.type=rtc."
                )
            actions = self._decode_fast(*self._prefix(batch))
        else:
            actions = self._sample_flow(batch, **kwargs)
        return actions[:, :, : self.config.output_features[ACTION].shape[0]]

    def _sample_flow(self, batch: dict[str, Tensor], noise: Tensor | None = None, **rtc_kwargs) -> Tensor:
        images, img_masks, tokens, masks, state = self._model_inputs(batch)
        if noise is None:
            shape = (tokens.shape[0], self.config.chunk_size, self.config.max_action_dim)
            noise = self.model.sample_noise(shape, tokens.device)
        inputs = (*images, *img_masks, tokens, masks, state, noise)
        if self._can_graph(tokens):
            if self._graphs is None:
                self._graphs = CUDAGraphCache(self._sample_inputs)
            return self._graphs(*inputs)
        return self._sample_inputs(*inputs, **rtc_kwargs)

    def _sample_inputs(self, *inputs: Tensor, **rtc_kwargs) -> Tensor:
        """`KIModel.sample_from_inputs` on the flat tensors of `_sample_flow`: the call a CUDA graph records
        (no RTC then), or runs eagerly."""
        n_cameras = (len(inputs) - 4) // 2
        return self.model.sample_from_inputs(
            *inputs, n_cameras=n_cameras, num_steps=self.config.num_inference_steps, **rtc_kwargs
        )

    def train(self, mode: bool = True) -> KIPolicy:
        if mode != self.training:  # a training phase may replace weights: record the graphs again
            self._graphs = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._graphs = None  # .to()/.cuda()/.half() make new tensors; recorded graphs read the old ones
        return super()._apply(fn, *args, **kwargs)

    def _can_graph(self, tokens: Tensor) -> bool:
        return self.config.cuda_graphs and tokens.is_cuda and not self.model.rtc_guided()

    def _decode_fast(self, prefix_embs: Tensor, prefix_pad: Tensor) -> Tensor:
        """pi0-FAST style: the backbone decodes FAST tokens, the tokenizer turns them into actions. A
        sequence that does not decode becomes a zero (mean) chunk, logged and counted, or an error once
        more than `fast_decode_max_failures` happened."""
        tok = self.fast_tokenizer
        if tok is None:
            raise ValueError("inference_mode=fast needs the FAST tokenizer, and this checkpoint has none.")
        ids = self.model.generate(
            prefix_embs,
            prefix_pad,
            self.config.max_fast_tokens,
            self.layout.eos_id,
            self.layout.fast_lm_range(),
        )
        rows = []
        for row in ids.tolist():
            row = row[: row.index(self.layout.eos_id)] if self.layout.eos_id in row else row
            rows.append(self.layout.lm_to_fast(torch.tensor(row, dtype=torch.long)).tolist())
        actions = torch.as_tensor(tok.decode(rows, strict=False), device=prefix_embs.device)
        failures = len(tok.last_decode_failures)
        if failures:
            self.num_fast_decode_failures += failures
            logger.warning(
                "%d FAST sequence(s) did not decode; returned zero chunks (total so far: %d)",
                failures,
                self.num_fast_decode_failures,
            )
            limit = self.config.fast_decode_max_failures
            if 0 <= limit < self.num_fast_decode_failures:
                raise FASTDecodeError(
                    f"{self.num_fast_decode_failures} undecodable FAST sequences (limit {limit})."
                )
        return pad_vector(actions.float(), self.config.max_action_dim)


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


def _saved_policy_type(path: str | Path, kwargs: dict) -> str | None:
    """The `type` in a checkpoint's config.json, if it has one (local dir or Hub). An unreachable Hub is
    one clear line here rather than a confusing error later."""
    cfg_file = checkpoint_file(path, "config.json", kwargs.get("revision"), optional=True)
    if cfg_file is None:
        return None
    return json.loads(Path(cfg_file).read_text()).get("type")
