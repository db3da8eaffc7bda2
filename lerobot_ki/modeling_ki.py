"""`KIPolicy`: the LeRobot glue around `KIModel` (batch checks, images, action queue, checkpoints)."""

from __future__ import annotations

import builtins
import logging
import re
from collections import deque
from pathlib import Path

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.common.vla_utils import pad_vector
from lerobot.policies.pretrained import PreTrainedPolicy, T
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from lerobot.utils.constants import ACTION, ACTION_TOKEN_MASK, ACTION_TOKENS
from safetensors import SafetensorError
from torch import Tensor

import lerobot_ki.vla_model as vla_model
from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.cuda_graphs import GraphedSampler
from lerobot_ki.fast import FASTDecodeError
from lerobot_ki.fast_artifacts import (
    DEFAULT_MAX_FAST_TOKENS,
    LEGACY_FAST_STATE_KEY,
    ActionTokenizer,
    configured_action_tokenizer,
    fast_from_tensor,
)
from lerobot_ki.model_inputs import ModelInputs, robot_inputs
from lerobot_ki.processor_ki import fast_tokenizer_of_checkpoint
from lerobot_ki.vla_model import KIModel
from lerobot_ki.vlm_cotraining import STATE_KEY, VLMCoTraining
from lerobot_ki.weights import (
    is_local_source,
    is_pi05_checkpoint,
    ki_config_from_pi05,
    load_paligemma_backbone,
    load_pi05_weights,
)

logger = logging.getLogger(__name__)


class KIPolicy(PreTrainedPolicy):
    """Knowledge-insulated VLA (Driess et al. 2025) as a LeRobot policy: `--policy.type=ki_vla`."""

    config_class = KIConfig
    name = "ki_vla"
    # Decoder layers of the backbone, the expert and the vision tower: the units FSDP shards (Accelerate's
    # transformer-based wrap policy reads `_no_split_modules`; tests/test_fsdp.py checks every layer is one).
    _fsdp_wrap_modules = ["KIDecoderLayer", "SiglipEncoderLayer"]
    _no_split_modules = _fsdp_wrap_modules

    def __init__(
        self,
        config: KIConfig,
        dataset_stats: dict | None = None,  # LeRobot's factory passes it; normalizing is the processor's
        fast_tokenizer: ActionTokenizer | None = None,
        **kwargs,
    ):
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.init_rtc_processor()
        self.model = KIModel(config)
        self._graphed: GraphedSampler | None = None  # on CUDA, built at the first flow inference
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        # The action tokenizer (FAST or naive bins) is owned and saved by the preprocessor's FAST step,
        # which encodes the training targets. The policy needs it only to decode `inference_mode=fast`:
        # handed in here, read from the checkpoint's preprocessor by `from_pretrained`, or made from the
        # config (see `fast_tokenizer`).
        self._fast = fast_tokenizer
        self._fast_source: tuple[str | Path, str | None] | None = None  # (checkpoint, revision)
        if config.paligemma_pretrained_path and not kwargs.get("_weights_follow"):
            report = load_paligemma_backbone(self, config, config.paligemma_pretrained_path)
            logger.info(report.summary())
        self.num_fast_decode_failures = 0
        # Training-time RTC: chunks sampled with a committed prefix inpainted, and how many of the engine's
        # delays were above rtc_training_max_delay (clamped).
        self.num_inpainted_chunks = 0
        self.num_clamped_rtc_delays = 0
        # VLM co-training (README "VLM co-training"): the policy draws VLM examples at each training step.
        self.vlm_cotraining = (
            VLMCoTraining(config, len(config.image_features)) if config.vlm_dataset is not None else None
        )
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
        local = is_local_source(pretrained_name_or_path)
        if local and not Path(pretrained_name_or_path).expanduser().is_dir():
            # Else huggingface_hub takes the path for a malformed repo id (HFValidationError).
            raise FileNotFoundError(
                f"No checkpoint directory at {pretrained_name_or_path}: it does not exist. Pass the folder "
                "lerobot-train wrote (<output_dir>/checkpoints/<step or last>/pretrained_model) or a Hub "
                "repo id."
            )
        if is_pi05_checkpoint(pretrained_name_or_path, kwargs.get("revision"), ours=cls.name):
            return cls._start_from_pi05(pretrained_name_or_path, config, kwargs)
        kwargs.pop("_weights_follow", None)
        policy = super().from_pretrained(
            pretrained_name_or_path, config=config, strict=strict, _weights_follow=True, **kwargs
        )
        if policy._fast is None:  # not in a pre-refactor model.safetensors (see _load_from_state_dict)
            # Read when first needed: flow inference never needs it, and an offline cache may hold only
            # the weights.
            policy._fast_source = (pretrained_name_or_path, kwargs.get("revision"))
        return policy

    @classmethod
    def _load_as_safetensor(cls, model: T, model_file: str, map_location: str, strict: bool) -> T:
        """LeRobot's loader, with the file and the config field named when the weights do not load."""
        try:
            return super()._load_as_safetensor(model, model_file, map_location, strict)
        except SafetensorError as e:
            raise OSError(
                f"{model_file} cannot be read ({e}): the file is truncated or corrupt (an interrupted "
                "copy or download?). Copy or download the checkpoint again."
            ) from e
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            raise ValueError(_size_mismatch_message(model_file, model.config, str(e))) from e

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
        logger.info(load_pi05_weights(policy, config, source, revision=revision).summary())
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
        # Checkpoints written before the preprocessor became the tokenizer's one owner also kept a copy in
        # model.safetensors: use it (their preprocessor holds the same bytes) rather than refuse the key.
        legacy = state_dict.pop(prefix + LEGACY_FAST_STATE_KEY, None)
        if legacy is not None and legacy.numel() > 0:
            self._fast = fast_from_tensor(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def fast_tokenizer(self) -> ActionTokenizer | None:
        """The action tokenizer (FAST, or naive bins with `action_tokenizer=naive`) that decodes
        `inference_mode=fast`: the one handed to the constructor or set here, else the checkpoint
        preprocessor's (`from_pretrained`), else what the config alone determines (naive bins, or
        `fast_tokenizer_path`). None when it is fitted on a dataset and this policy was not given it."""
        if self._fast is None and self._fast_source is not None:
            self._fast = fast_tokenizer_of_checkpoint(*self._fast_source)
            self._fast_source = None
        if self._fast is None:
            self._fast = configured_action_tokenizer(self.config)
        if self._fast is not None and self._fast.kind != self.config.action_tokenizer:
            raise ValueError(
                f"This checkpoint's action tokenizer is {self._fast.kind!r} but action_tokenizer="
                f"{self.config.action_tokenizer!r}: drop --policy.action_tokenizer or pass "
                f"--policy.action_tokenizer={self._fast.kind}."
            )
        return self._fast

    @fast_tokenizer.setter
    def fast_tokenizer(self, tokenizer: ActionTokenizer | None) -> None:
        self._fast, self._fast_source = tokenizer, None

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

    def _rtc_enabled(self) -> bool:
        return self.config.rtc_config is not None and self.config.rtc_config.enabled

    def rtc_guided(self) -> bool:
        """RTC guidance or its debug tracking is on: sampling goes through LeRobot's `euler_integrate`
        (an autograd call and host->device copies per step), which a CUDA graph cannot record whole."""
        rtc = self.rtc_processor
        return self._rtc_enabled() or (rtc is not None and rtc.is_debug_enabled())

    # --- inputs -------------------------------------------------------------------------------------
    def _check_actions(self, batch: dict[str, Tensor]) -> Tensor:
        # FAST tokens mean the ki_vla preprocessor ran, and its FAST step refused non-finite actions.
        if ACTION_TOKENS not in batch:
            raise ValueError("The batch has no FAST tokens: run it through the ki_vla preprocessor.")
        actions = batch[ACTION]
        if actions.ndim != 3:
            raise ValueError(f"Expected an action chunk (B, T, A), got {tuple(actions.shape)}.")
        if actions.shape[-1] > self.config.max_action_dim:
            raise ValueError(
                f"The action has {actions.shape[-1]} dims but max_action_dim={self.config.max_action_dim}: "
                f"pass --policy.max_action_dim={actions.shape[-1]}."
            )
        return actions

    # --- training -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        """The training loss: a scalar, or with reduction="none" per-sample losses (B,) whose mean is that
        scalar, for LeRobot's per-sample weighting (`--sample_weighting.type=...`, as pi05 offers)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none' (per-sample losses), got {reduction!r}.")
        actions = self._check_actions(batch)
        bsz, horizon, action_dim = actions.shape
        step_ok = ~batch.get(
            f"{ACTION}_is_pad", torch.zeros(bsz, horizon, dtype=torch.bool, device=actions.device)
        )
        dim_ok = torch.arange(self.config.max_action_dim, device=actions.device) < action_dim
        flow_mask = step_ok[:, :, None] & dim_ok[None, None, :]  # (B, T, A_max): padding is excluded
        out = self.model(
            robot_inputs(batch, self.config),
            batch[ACTION_TOKENS],
            batch[ACTION_TOKEN_MASK].bool(),
            pad_vector(actions, self.config.max_action_dim),
            flow_mask,
            reduction=reduction,
        )
        loss = (
            self.config.fast_loss_weight * out["loss_fast_ce"]
            + self.config.flow_loss_weight * out["loss_flow"]
        )
        info = {k: float(v.detach().mean()) for k, v in out.items()}
        if self.vlm_cotraining is not None and self.training:  # evaluation batches draw no VLM examples
            vlm_loss, vlm_info = self.vlm_cotraining.loss(self.model, bsz)
            if vlm_loss is not None:
                loss = loss + self.config.vlm_loss_weight * vlm_loss
            info.update(vlm_info)
        info["loss"] = float(loss.detach().mean())
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
            actions = self._decode_fast(robot_inputs(batch, self.config))
        else:
            actions = self._sample_flow(robot_inputs(batch, self.config), **kwargs)
        return actions[:, :, : self.config.output_features[ACTION].shape[0]]

    def _sample_flow(self, inputs: ModelInputs, noise: Tensor | None = None, **rtc_kwargs) -> Tensor:
        if noise is None:
            shape = (inputs.batch_size, self.config.chunk_size, self.config.max_action_dim)
            noise = self.model.sample_noise(shape, inputs.prompt_ids.device)
        num_steps = self.config.num_inference_steps
        # A checkpoint trained with training-time RTC continues the committed actions itself: it is never
        # guided (no autograd), and samples on the sync path (the CUDA graph on CUDA) with them inpainted.
        trained_rtc = self.config.rtc_training_max_delay > 0
        graphed = self.config.cuda_graphs and noise.is_cuda
        if graphed and self._graphed is None:
            self._graphed = GraphedSampler(self.model, num_steps)
        if not trained_rtc and self.rtc_guided():
            rtc, enabled = self.rtc_processor, self._rtc_enabled()
            # LeRobot's guided loop stays eager; its prefill and expert steps replay as CUDA graphs, unless
            # the guidance differentiates through the expert (a graph replay has no autograd).
            if graphed and not vla_model.guidance_differentiates_velocity():
                return self._graphed.guided(inputs, noise, rtc, enabled, **rtc_kwargs)
            return self.model.sample_actions(inputs, noise, num_steps, rtc, enabled, **rtc_kwargs)
        committed, delay = self._committed_prefix(noise, **rtc_kwargs) if trained_rtc else (None, None)
        if graphed:
            return self._graphed(inputs, noise, committed, delay)
        return self.model.sample_actions(inputs, noise, num_steps, committed=committed, delay=delay)

    def _committed_prefix(
        self,
        noise: Tensor,  # (B, T, A_max)
        inference_delay: int | None = None,
        prev_chunk_left_over: Tensor | None = None,  # (L, A) or (B, L, A), normalized (the engine's)
        **_: object,  # execution_horizon etc.: guidance settings, unused when inpainting
    ) -> tuple[Tensor | None, Tensor | None]:
        """Training-time RTC: the actions LeRobot's RTC engine says are committed, as (committed (B, T,
        A_max), delay (B,)) for `KIModel.sample_actions`; (None, None) when nothing is committed. The engine
        hands the leftover of the previous chunk as this policy returned it (normalized, action dims only),
        and `inference_delay` of them will execute before the new chunk starts. More than the checkpoint
        was trained with are clamped to `rtc_training_max_delay` (the model never saw longer prefixes)."""
        if prev_chunk_left_over is None or not inference_delay:
            return None, None
        max_delay = self.config.rtc_training_max_delay
        d = int(inference_delay)
        if d > max_delay:
            self.num_clamped_rtc_delays += 1
            if self.num_clamped_rtc_delays == 1 or self.num_clamped_rtc_delays % 100 == 0:
                logger.warning(
                    "RTC inference_delay=%d is above rtc_training_max_delay=%d (what this checkpoint was "
                    "trained with): inpainting only the first %d committed actions (%d clamped so far). "
                    "Train with a larger --policy.rtc_training_max_delay or make inference faster.",
                    d,
                    max_delay,
                    max_delay,
                    self.num_clamped_rtc_delays,
                )
            d = max_delay
        prev = prev_chunk_left_over if prev_chunk_left_over.ndim == 3 else prev_chunk_left_over[None]
        bsz, horizon, width = noise.shape
        if prev.shape[-1] > width:
            raise ValueError(
                f"prev_chunk_left_over has {prev.shape[-1]} action dims, max_action_dim={width}."
            )
        d = min(d, prev.shape[1])  # the engine hands at most execution_horizon actions
        committed = noise.new_zeros(bsz, horizon, width)
        committed[:, :d, : prev.shape[-1]] = prev[:, :d].to(device=noise.device, dtype=noise.dtype)
        self.num_inpainted_chunks += 1
        if self.num_inpainted_chunks == 1:  # once: says which RTC a rollout log's run used
            logger.info(
                "Training-time RTC (rtc_training_max_delay=%d): inpainting the committed actions, "
                "no guidance.",
                max_delay,
            )
        return committed, torch.full((bsz,), d, dtype=torch.long, device=noise.device)

    def _decode_fast(self, inputs: ModelInputs) -> Tensor:
        """pi0-FAST style: the backbone decodes FAST tokens, the tokenizer turns them into actions. A
        sequence that does not decode becomes a zero (mean) chunk, logged and counted, or an error once
        more than `fast_decode_max_failures` happened."""
        tok = self.fast_tokenizer
        if tok is None:
            raise ValueError(
                "inference_mode=fast needs the FAST tokenizer that encoded the training actions. It is saved "
                "with the preprocessor (policy_preprocessor*.json / .safetensors): load the policy with "
                "from_pretrained from a checkpoint folder or Hub repo that has them, set "
                "policy.fast_tokenizer = fast_tokenizer_of(preprocessor), or pass "
                "--policy.fast_tokenizer_path=DIR (lerobot-ki-fit-fast)."
            )
        layout = self.model.layout
        # None only for a policy whose processors were never built (they settle it): pi0.5's budget.
        budget = self.config.max_fast_tokens or DEFAULT_MAX_FAST_TOKENS
        ids = self.model.generate(inputs, budget, layout.eos_id, layout.fast_lm_range())
        rows = []
        for row in ids.tolist():
            row = row[: row.index(layout.eos_id)] if layout.eos_id in row else row
            rows.append(layout.lm_to_fast(torch.tensor(row, dtype=torch.long)).tolist())
        actions = torch.as_tensor(tok.decode(rows, strict=False), device=ids.device)
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


# Which config.json field sizes a weight, by a part of its name (the first match wins); the towers'
# widths and depths come from the variants.
_SIZED_BY = (
    ("action_in_proj", "max_action_dim"),
    ("action_out_proj", "max_action_dim"),
    ("state_proj", "max_state_dim"),
    ("embed_tokens", "text_tokenizer / fast_vocab_size"),
    ("lm_head", "text_tokenizer / fast_vocab_size"),
    ("gemma_expert", "action_expert_variant"),
    ("", "paligemma_variant"),
)


def _size_mismatch_message(model_file: str, config: KIConfig, error: str) -> str:
    """torch's "size mismatch for <name>: ... shape ..." lines -> the config fields that disagree."""
    lines = re.findall(r"size mismatch for ([\w.]+): (.*)", error)
    fields = []
    for name, _ in lines:
        field = next(f for part, f in _SIZED_BY if part in name)
        if field not in fields:
            fields.append(field)
    now = ", ".join(f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f))
    first_name, first_shapes = lines[0]
    return (
        f"The config.json beside {model_file} does not match its weights: {len(lines)} weight(s) have "
        f"other shapes, e.g. {first_name}: {first_shapes.rstrip('.')}. The config field(s) that size them: "
        f"{', '.join(fields)}{f' (config.json says {now})' if now else ''}. Restore the config.json saved "
        "with these weights, or set those fields to the values they were trained with."
    )
