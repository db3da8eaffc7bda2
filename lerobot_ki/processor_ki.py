"""Pre/post-processing pipelines of `ki_vla`, built from LeRobot's default steps plus four of ours.

pre:  rename -> batch -> check inputs -> normalize (quantiles)
      -> prompt `Task: <task>, State: <bins>;\\nAction: ` -> text tokens
      -> FAST action tokens (only when actions are present) -> device
post: unnormalize -> cpu

Both tokenizers live in the steps' saved state (safetensors beside the pipeline JSON), so a saved or
pushed checkpoint needs no download to run: `from_pretrained` rebuilds them from those bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import PipelineFeatureType, PolicyFeature
from lerobot.lerobot_types import EnvTransition, TransitionKey
from lerobot.processor import (
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStep,
    ProcessorStepRegistry,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)
from lerobot.utils.constants import (
    ACTION,
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
    POLICY_PREPROCESSOR_DEFAULT_NAME,
)

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.fast_artifacts import (
    ActionTokenizer,
    fast_from_tensor,
    fast_to_tensor,
    resolve_fast_budget,
    resolve_fast_tokenizer,
)
from lerobot_ki.text_tokenizer import TextTokenizer, load_text_tokenizer
from lerobot_ki.vocabulary import VocabLayout, fast_to_lm, vocab_layout

logger = logging.getLogger(__name__)

STATE_BINS = 256
PREPROCESSOR_FILE = f"{POLICY_PREPROCESSOR_DEFAULT_NAME}.json"  # what lerobot-train saves next to the weights


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def _tensor_text(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).cpu().numpy().tobytes()).decode("utf-8")


def discretize_state(state: torch.Tensor) -> np.ndarray:
    """Normalized state in [-1, 1] (B, S) -> integer bins 0..255, as pi0.5 writes it into the prompt."""
    bins = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    return np.clip(np.digitize(state.float().cpu().numpy(), bins=bins) - 1, 0, STATE_BINS - 1)


def build_prompts(tasks: list[str], state: torch.Tensor | None) -> list[str]:
    """`state` None => the state is not written (continuous state mode feeds it as a token)."""
    binned = discretize_state(state) if state is not None else None
    prompts = []
    for i, task in enumerate(tasks):
        text = task.strip().replace("_", " ").replace("\n", " ")
        if binned is None:
            prompts.append(f"Task: {text};\nAction: ")
        else:
            prompts.append(f"Task: {text}, State: {' '.join(map(str, binned[i]))};\nAction: ")
    return prompts


MIN_IMAGE_SIDE = 5  # LeRobot's resize_with_pad takes an image whose last dim is <= 4 for channels-last


@ProcessorStepRegistry.register(name="ki_vla_input_check")
@dataclass
class KIInputCheckStep(ProcessorStep):
    """Checks the raw observation against the config's input features, before normalization, so that a
    wrong format is reported by name here instead of as a tensor-size error deep in LeRobot's normalizer or
    the model: camera images (float in [0, 1], (B, 3, H, W), at least MIN_IMAGE_SIDE pixels a side), the
    state's width, and one batch size across images, state, task strings and actions."""

    image_keys: list[str] = field(default_factory=list)
    state_dim: int | None = None
    task_key: str = "task"

    @classmethod
    def for_config(cls, config: KIConfig) -> KIInputCheckStep:
        state = config.input_features.get(OBS_STATE)
        return cls(image_keys=list(config.image_features), state_dim=state.shape[-1] if state else None)

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        obs = transition.get(TransitionKey.OBSERVATION) or {}
        sizes: dict[str, int] = {}
        for key in self.image_keys:
            if key in obs:
                _check_image(key, obs[key])
                sizes[key] = obs[key].shape[0]
        state = obs.get(OBS_STATE)
        if isinstance(state, torch.Tensor):
            if self.state_dim is not None and state.shape[-1] != self.state_dim:
                raise ValueError(
                    f"'{OBS_STATE}' has {state.shape[-1]} values per sample (shape {tuple(state.shape)}) but "
                    f"this policy expects {self.state_dim} (its input feature {OBS_STATE}). Send the "
                    "robot's state with the layout the policy was trained on."
                )
            sizes[OBS_STATE] = state.shape[0] if state.ndim > 1 else 1
        tasks = (transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}).get(self.task_key)
        if isinstance(tasks, list | tuple) and len(tasks) != 1:  # one string is used for every sample
            sizes[f"{self.task_key} (strings)"] = len(tasks)
        action = transition.get(TransitionKey.ACTION)
        if isinstance(action, torch.Tensor) and action.ndim > 1:
            sizes[ACTION] = action.shape[0]
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{k}: {n}" for k, n in sizes.items())
            raise ValueError(
                f"The batch's parts have different batch sizes ({listed}): every camera, the state, the "
                "task strings (or one string for all) and the actions need one entry per sample."
            )
        return transition

    def get_config(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys, "state_dim": self.state_dim, "task_key": self.task_key}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features


def _check_image(key: str, img: Any) -> None:
    """A camera frame as LeRobot's datasets and env processors give it: float in [0, 1], channels first."""
    expected = "float images in [0, 1], channels first (B, 3, H, W), as LeRobot's datasets give them"
    if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 3:
        got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"Camera '{key}' is {got}; ki_vla expects {expected}.")
    if not img.is_floating_point():
        raise ValueError(
            f"Camera '{key}' is {img.dtype}; ki_vla expects {expected}: convert with "
            "`img.float() / 255` (uint8 HWC frames: also `.permute(0, 3, 1, 2)`)."
        )
    if min(img.shape[-2:]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"Camera '{key}' is {img.shape[-2]}x{img.shape[-1]} pixels; ki_vla needs at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} ({expected}). Is it channels-last or a bad crop?"
        )
    finite = img[torch.isfinite(img)]  # NaN/Inf are reported by the model's own check
    if finite.numel() and (finite.max() > 1.5 or finite.min() < -0.5):
        raise ValueError(
            f"Camera '{key}' has values in [{float(finite.min()):.3g}, {float(finite.max()):.3g}]; ki_vla "
            f"expects {expected}. Values in [0, 255] need `/ 255`."
        )


@ProcessorStepRegistry.register(name="ki_vla_prompt")
@dataclass
class KIPromptStep(ProcessorStep):
    """Checks the observation and writes the prompt (task + 256-bin state) into `task`."""

    max_state_dim: int = 32
    state_in_prompt: bool = True
    task_key: str = "task"

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        transition = transition.copy()
        obs = transition.get(TransitionKey.OBSERVATION) or {}
        state = obs.get(OBS_STATE)
        if state is None:
            raise ValueError(
                f"ki_vla needs '{OBS_STATE}' in every observation (found keys {sorted(obs)}). "
                "Record the robot state, or map yours with --rename_map."
            )
        if state.shape[-1] > self.max_state_dim:
            raise ValueError(
                f"The state has {state.shape[-1]} dims but max_state_dim={self.max_state_dim}: "
                f"pass --policy.max_state_dim={state.shape[-1]}."
            )
        if not torch.isfinite(state).all():
            raise ValueError(f"'{OBS_STATE}' contains NaN or Inf: check the robot's sensors/dataset.")
        comp = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        tasks = comp.get(self.task_key)
        if tasks is None:
            raise ValueError("No task string in the batch: ki_vla is language-conditioned; pass a task.")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if len(tasks) == 1 and state.shape[0] > 1:
            tasks = tasks * state.shape[0]
        if any(not isinstance(t, str) or not t.strip() for t in tasks):
            raise ValueError(
                "Empty task string: ki_vla needs a task description for every sample "
                "(dataset tasks.parquet, or --task / the env's task description)."
            )
        comp[self.task_key] = build_prompts(tasks, state if self.state_in_prompt else None)
        transition[TransitionKey.COMPLEMENTARY_DATA] = comp
        return transition

    def get_config(self) -> dict[str, Any]:
        return {
            "max_state_dim": self.max_state_dim,
            "state_in_prompt": self.state_in_prompt,
            "task_key": self.task_key,
        }

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features


@ProcessorStepRegistry.register(name="ki_vla_text_tokenizer")
@dataclass
class KITextTokenizerStep(ProcessorStep):
    """Tokenizes the prompt with the backbone's tokenizer; the tokenizer itself is the step's state."""

    tokenizer_name: str = "byte"
    max_length: int = 200
    fast_vocab_size: int = 1024
    task_key: str = "task"
    tokenizer: TextTokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # A step rebuilt by `from_pretrained` gets its tokenizer from `load_state_dict`; the byte
        # tokenizer needs no file at all.
        if self.tokenizer is None and self.tokenizer_name == "byte":
            self.tokenizer = load_text_tokenizer("byte", self.fast_vocab_size)

    @property
    def layout(self) -> VocabLayout:
        return vocab_layout(self.tokenizer_name, self.fast_vocab_size)

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        if self.tokenizer is None:
            raise RuntimeError(f"The text tokenizer {self.tokenizer_name!r} was never loaded.")
        transition = transition.copy()
        prompts = transition[TransitionKey.COMPLEMENTARY_DATA][self.task_key]
        ids, mask = self.tokenizer.encode_batch(list(prompts), self.max_length)
        obs = dict(transition[TransitionKey.OBSERVATION])
        obs[OBS_LANGUAGE_TOKENS], obs[OBS_LANGUAGE_ATTENTION_MASK] = ids, mask
        transition[TransitionKey.OBSERVATION] = obs
        return transition

    def get_config(self) -> dict[str, Any]:
        return {
            "tokenizer_name": self.tokenizer_name,
            "max_length": self.max_length,
            "fast_vocab_size": self.fast_vocab_size,
            "task_key": self.task_key,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokenizer_json": _bytes_tensor(self.tokenizer.to_str())} if self.tokenizer else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "tokenizer_json" in state:
            self.tokenizer = TextTokenizer.from_str(_tensor_text(state["tokenizer_json"]), self.layout)

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features


@ProcessorStepRegistry.register(name="ki_vla_fast_tokenizer")
@dataclass
class KIFastTokenizerStep(ProcessorStep):
    """Normalized action chunks (B, T, A) -> FAST LM ids + EOS, right-padded to `max_fast_tokens`.

    `fast_tokenizer` is whichever action tokenizer the config chose (FAST, or `NaiveActionTokenizer` with
    `action_tokenizer=naive`): both give ids in [0, fast_vocab_size) that take the same vocabulary slots.

    Runs only when the batch holds actions (training); at inference it passes the transition through.
    The placement of FAST ids (`fast_offset`, `fast_sign`) and the special ids are the `VocabLayout`'s
    (`for_layout`), saved in the step's config so that a saved pipeline keeps the placement it trained with.
    """

    fast_offset: int
    fast_sign: int
    eos_id: int
    pad_id: int
    max_fast_tokens: int = 64
    overflow: str = "error"  # "error" | "truncate"
    fast_tokenizer: Any = field(default=None, repr=False)
    num_truncated: int = field(default=0, repr=False)
    num_chunks: int = field(default=0, repr=False)

    @classmethod
    def for_layout(cls, layout: VocabLayout, **kwargs) -> KIFastTokenizerStep:
        return cls(layout.fast_offset, layout.fast_sign, layout.eos_id, layout.pad_id, **kwargs)

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        action = transition.get(TransitionKey.ACTION)
        if action is None:
            return transition
        # A single step (B, A), e.g. an env or inference batch, is no chunk: nothing to encode, whether
        # or not this pipeline holds a tokenizer (one built from config + stats alone has none).
        if action.ndim == 2:
            return transition
        if self.fast_tokenizer is None:
            raise RuntimeError(
                "Actions are present but this pipeline has no FAST tokenizer. Train with a dataset (it is "
                "fitted automatically) or pass --policy.fast_tokenizer_path=DIR (lerobot-ki-fit-fast)."
            )
        if not torch.isfinite(action).all():
            raise ValueError("The action chunk contains NaN or Inf: check the dataset's actions.")
        token_lists = self.fast_tokenizer.encode(action.detach().float().cpu())
        ids = torch.full((len(token_lists), self.max_fast_tokens), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), self.max_fast_tokens), dtype=torch.bool)
        for i, toks in enumerate(token_lists):
            lm = fast_to_lm(toks, self.fast_offset, self.fast_sign) + [self.eos_id]
            self.num_chunks += 1
            if len(lm) > self.max_fast_tokens:
                if self.overflow == "error":
                    raise ValueError(
                        f"An action chunk needs {len(lm)} FAST tokens (EOS included) but max_fast_tokens="
                        f"{self.max_fast_tokens}. Raise --policy.max_fast_tokens, shorten "
                        "--policy.chunk_size, "
                        "or pass --policy.fast_overflow=truncate."
                    )
                self.num_truncated += 1
                logger.warning(
                    "FAST chunk of %d tokens truncated to %d (%d of %d chunks so far)",
                    len(lm),
                    self.max_fast_tokens,
                    self.num_truncated,
                    self.num_chunks,
                )
                lm = lm[: self.max_fast_tokens - 1] + [self.eos_id]
            ids[i, : len(lm)] = torch.tensor(lm, dtype=torch.long)
            mask[i, : len(lm)] = True
        transition = transition.copy()
        comp = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        comp[ACTION_TOKENS], comp[ACTION_TOKEN_MASK] = ids, mask
        transition[TransitionKey.COMPLEMENTARY_DATA] = comp
        return transition

    def get_config(self) -> dict[str, Any]:
        return {
            "max_fast_tokens": self.max_fast_tokens,
            "overflow": self.overflow,
            "fast_offset": self.fast_offset,
            "fast_sign": self.fast_sign,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"fast_tokenizer": fast_to_tensor(self.fast_tokenizer)} if self.fast_tokenizer else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "fast_tokenizer" in state:
            self.fast_tokenizer = fast_from_tensor(state["fast_tokenizer"])

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features


def make_ki_vla_pre_post_processors(
    config: KIConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
    fast_tokenizer: ActionTokenizer | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    _check_quantile_stats(config, dataset_stats)
    steps = make_default_policy_processor_steps(config, dataset_stats)
    layout = vocab_layout(config.text_tokenizer, config.fast_vocab_size)
    if fast_tokenizer is None:
        fast = resolve_fast_tokenizer(config, dataset_stats)  # also settles config.max_fast_tokens
    else:
        fast = fast_tokenizer
        resolve_fast_budget(config, None)
    # FAST token t takes LM id offset + sign * t: a tokenizer with more tokens than the layout reserves
    # would write into the text vocabulary (PaliGemma) or past the embedding (byte), silently or at step 1.
    if fast is not None and fast.vocab_size > config.fast_vocab_size:
        raise ValueError(
            f"The action tokenizer has {fast.vocab_size} tokens but --policy.fast_vocab_size="
            f"{config.fast_vocab_size} reserves only {config.fast_vocab_size} vocabulary slots for them: "
            f"pass --policy.fast_vocab_size={fast.vocab_size}, or refit FAST with lerobot-ki-fit-fast "
            f"--vocab_size={config.fast_vocab_size}."
        )
    input_steps: list[ProcessorStep] = [
        steps.rename_observations,
        steps.add_batch_dim,
        KIInputCheckStep.for_config(config),  # before the normalizer, which would fail on a bad shape
        steps.normalize,  # before the prompt: the state is binned from its [-1, 1] normalized value
        KIPromptStep(max_state_dim=config.max_state_dim, state_in_prompt=config.state_mode == "text"),
        KITextTokenizerStep(
            tokenizer_name=config.text_tokenizer,
            max_length=config.tokenizer_max_length,
            fast_vocab_size=config.fast_vocab_size,
            tokenizer=load_text_tokenizer(config.text_tokenizer, config.fast_vocab_size),
        ),
        KIFastTokenizerStep.for_layout(
            layout, max_fast_tokens=config.max_fast_tokens, overflow=config.fast_overflow, fast_tokenizer=fast
        ),
        steps.to_device,
    ]
    output_steps: list[ProcessorStep] = [steps.unnormalize, steps.to_cpu]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=output_steps)


def fast_tokenizer_of(preprocessor: PolicyProcessorPipeline) -> ActionTokenizer | None:
    """The action tokenizer held by a ki_vla preprocessor's FAST step (its one saved copy)."""
    for step in preprocessor.steps:
        if isinstance(step, KIFastTokenizerStep):
            return step.fast_tokenizer
    raise ValueError("This preprocessor has no ki_vla FAST tokenizer step.")


def fast_tokenizer_of_checkpoint(source: str | Path, revision: str | None = None) -> ActionTokenizer | None:
    """The action tokenizer saved with a checkpoint (local folder or Hub repo): its preprocessor's, loaded
    by LeRobot's pipeline loader. None when the checkpoint has no preprocessor files (a bare
    `save_pretrained`)."""
    from lerobot_ki.weights import checkpoint_file

    if checkpoint_file(source, PREPROCESSOR_FILE, revision, optional=True) is None:
        return None
    preprocessor = PolicyProcessorPipeline.from_pretrained(
        source,
        config_filename=PREPROCESSOR_FILE,
        revision=revision,
        # Only the FAST step's state is wanted: keep the device step off any accelerator.
        overrides={"device_processor": {"device": "cpu"}},
    )
    return fast_tokenizer_of(preprocessor)


def text_tokenizer_of(preprocessor: PolicyProcessorPipeline) -> TextTokenizer:
    """The tokenizer saved in a ki_vla preprocessor, e.g. for `text_generation.generate_text` where the
    config's tokenizer (a Hub id) cannot be loaded."""
    for step in preprocessor.steps:
        if isinstance(step, KITextTokenizerStep) and step.tokenizer is not None:
            return step.tokenizer
    raise ValueError("This preprocessor has no loaded ki_vla text tokenizer step.")


def _check_quantile_stats(config: KIConfig, stats: dict[str, dict[str, Any]] | None) -> None:
    """pi0.5-style quantile normalization needs q01/q99; say so up front instead of deep in a step."""
    if stats is None:
        return
    features = {**config.input_features, **config.output_features}
    for key, feature in features.items():
        mode = config.normalization_mapping.get(feature.type.value)
        if mode is None or mode.value != "QUANTILES" or key not in stats:
            continue
        missing = [q for q in ("q01", "q99") if q not in stats[key]]
        if missing:
            raise ValueError(
                f"Dataset stats for '{key}' lack {missing}, needed by ki_vla's quantile normalization. "
                "Recompute them with LeRobot's `augment_dataset_quantile_stats.py`, or pass "
                '--policy.normalization_mapping=\'{"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}\'.'
            )
