"""Where the action tokenizer (FAST, or naive bins with `--policy.action_tokenizer=naive`) comes from and
how it travels with a checkpoint.

- `resolve_fast_tokenizer`: the one place that builds the action tokenizer for a new run, called by the
  processor factory (the preprocessor's FAST step owns the tokenizer and saves the one copy). Naive bins
  need nothing; FAST comes from a configured directory (`configured_action_tokenizer`), else is fitted on
  the training dataset's action chunks (normalized exactly as the processor normalizes them).
- `fast_to_tensor` / `fast_from_tensor`: the tokenizer's saved files as one uint8 tensor, so it is part
  of the processor state: whatever uploads or copies the checkpoint carries it, and loading needs no
  network.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.processor import NormalizerProcessorStep
from lerobot.utils.constants import ACTION

from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.naive_tokens import (
    NAIVE_CONFIG,
    NaiveActionTokenizer,
    naive_budget_error,
    naive_tokens_per_chunk,
)

ActionTokenizer = FASTTokenizer | NaiveActionTokenizer  # what `config.action_tokenizer` selects

logger = logging.getLogger(__name__)

# Where checkpoints written before 2026-11-27 also kept the tokenizer: a buffer of model.safetensors.
LEGACY_FAST_STATE_KEY = "fast_tokenizer_state"

# `max_fast_tokens` when the config leaves it None and there is no training data to size it from.
DEFAULT_MAX_FAST_TOKENS = 64
FAST_BUDGET_MULTIPLE = 8


def fast_to_tensor(tok: ActionTokenizer) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}
    blob = json.dumps(files, sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def fast_from_tensor(blob: torch.Tensor) -> ActionTokenizer:
    files = json.loads(bytes(blob.to(torch.uint8).cpu().numpy().tobytes()).decode("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_action_tokenizer(tmp)


def load_action_tokenizer(directory: str | Path) -> ActionTokenizer:
    """A saved action tokenizer of either kind (the naive one writes `naive_tokens_config.json`)."""
    if (Path(directory) / NAIVE_CONFIG).is_file():
        return NaiveActionTokenizer.from_pretrained(directory)
    return FASTTokenizer.from_pretrained(directory)


def load_action_chunks(
    repo_id: str, root: str | Path | None, chunk_size: int, max_chunks: int, episodes: list[int] | None = None
) -> np.ndarray:
    """Raw action chunks (N, T, A) from a LeRobot dataset, read from its parquet data (no video decoding).

    Chunks start at evenly spaced frames; a chunk running past its episode's end repeats the last action,
    as LeRobot's `delta_timestamps` padding does for the training batches.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id, root=root, episodes=episodes)
    table = ds.hf_dataset.with_format("numpy")
    actions = np.asarray(np.stack(table[ACTION]), dtype=np.float64)  # (F, A)
    episode = np.asarray(table["episode_index"])  # (F,)
    if len(actions) == 0:
        raise ValueError(f"The dataset {repo_id!r} has no frames: nothing to fit FAST on.")
    _check_finite_actions(repo_id, actions, np.asarray(table["index"]), episode)
    # Last frame index of each frame's episode (frames of an episode are contiguous).
    change = np.flatnonzero(np.diff(episode)) + 1
    ends = np.repeat(
        np.append(change, len(episode)) - 1, np.diff(np.concatenate([[0], change, [len(episode)]]))
    )
    starts = np.unique(np.linspace(0, len(actions) - 1, num=min(max_chunks, len(actions))).astype(int))
    idx = np.minimum(starts[:, None] + np.arange(chunk_size)[None], ends[starts][:, None])  # (N, T)
    return actions[idx]


def _check_finite_actions(
    repo_id: str, actions: np.ndarray, frames: np.ndarray, episodes: np.ndarray
) -> None:
    """Names the raw frames with NaN/Inf actions; found later, in the fitted chunks, a single bad value has
    been copied into every chunk that covers it and its origin is lost."""
    bad = ~np.isfinite(actions)  # (F, A)
    if not bad.any():
        return
    rows = np.flatnonzero(bad.any(axis=1))
    dims = np.flatnonzero(bad.any(axis=0))
    bad_episodes = np.unique(episodes[rows]).tolist()
    more = " ..." if len(rows) > 10 else ""
    raise ValueError(
        f"The dataset {repo_id!r} has NaN/Inf in '{ACTION}' at {int(bad.sum())} value(s): dimension(s) "
        f"{dims.tolist()}, frame index(es) {frames[rows][:10].tolist()}{more} in episode(s) {bad_episodes}. "
        "FAST cannot be fitted on, nor a policy trained with, non-finite actions: clean the dataset (fix "
        "those frames, or drop their episodes: lerobot-edit-dataset --operation.type=delete_episodes "
        f'--operation.episode_indices="{bad_episodes}") and recompute its stats.'
    )


def normalize_action_chunks(chunks: np.ndarray, config: Any, stats: dict) -> np.ndarray:
    """Apply the same LeRobot normalizer the training processor applies to actions."""
    norm = NormalizerProcessorStep(
        features={ACTION: config.output_features[ACTION]}, norm_map=config.normalization_mapping, stats=stats
    )
    return norm._normalize_action(torch.as_tensor(chunks, dtype=torch.float32), inverse=False).numpy()  # noqa: SLF001


def training_chunks(
    repo_id: str, root: str | Path | None, config: Any, stats: dict, episodes: list[int] | None = None
) -> np.ndarray:
    """The action chunks (N, T, A) FAST is fitted and measured on, normalized as the processor does."""
    chunks = load_action_chunks(repo_id, root, config.chunk_size, config.fast_fit_max_chunks, episodes)
    return normalize_action_chunks(chunks, config, stats)


def fit_fast_on_dataset(
    repo_id: str, root: str | Path | None, config: Any, stats: dict, episodes: list[int] | None = None
) -> tuple[FASTTokenizer, dict]:
    chunks = training_chunks(repo_id, root, config, stats, episodes)
    tok = FASTTokenizer.fit(chunks, vocab_size=config.fast_vocab_size, scale=config.fast_scale)
    return tok, tok.stats(chunks)


def configured_action_tokenizer(config: Any) -> ActionTokenizer | None:
    """The action tokenizer the config alone determines: naive bins (`action_tokenizer=naive`), or FAST
    loaded from `fast_tokenizer_path`; None when FAST is to be fitted on a dataset."""
    tok = None
    if config.action_tokenizer == "naive":
        tok = NaiveActionTokenizer(config.chunk_size, _action_dim(config))
        if tok.action_dim is not None:
            error = naive_budget_error(config.chunk_size, tok.action_dim, config.max_fast_tokens)
            if error:
                raise ValueError(error)
    elif config.fast_tokenizer_path:
        tok = FASTTokenizer.from_pretrained(config.fast_tokenizer_path)
    if tok is not None:
        _check_shape(tok, config)
    return tok


def resolve_fast_tokenizer(config: Any, dataset_stats: dict | None) -> ActionTokenizer | None:
    """The action tokenizer of a new run: `configured_action_tokenizer`, else FAST fitted on the dataset
    LeRobot is training on (its `make_policy` sets `config._runtime_dataset_meta`), else None.

    Also settles `config.max_fast_tokens` (`resolve_fast_budget`) from the tokenizer's token counts on the
    training data, so that a budget too small for the data stops the run here, before its first step."""
    tok = configured_action_tokenizer(config)
    meta = getattr(config, "_runtime_dataset_meta", None)
    stats = None
    if tok is not None and config.action_tokenizer == "naive":
        logger.info("Naive action tokens: %s", tok)
    elif tok is not None:
        logger.info("FAST tokenizer loaded from %s: %s", config.fast_tokenizer_path, tok)
        if meta is not None and dataset_stats is not None:
            stats = tok.stats(training_chunks(meta.repo_id, meta.root, config, dataset_stats))
    elif meta is not None and dataset_stats is not None:
        tok, stats = fit_fast_on_dataset(meta.repo_id, meta.root, config, dataset_stats)
        logger.info(
            "FAST fitted on %s: %d chunks, vocab %d, tokens/chunk mean %.1f p99 %.0f max %d, "
            "reconstruction MAE %.4f (max %.4f)",
            meta.repo_id,
            stats["num_chunks"],
            stats["vocab_size"],
            stats["mean_tokens"],
            stats["p99_tokens"],
            stats["max_tokens"],
            stats["recon_mae"],
            stats["recon_max_abs"],
        )
    resolve_fast_budget(config, stats, meta.repo_id if meta is not None else None)
    return tok


def fast_budget_for(max_tokens: int) -> int:
    """The `max_fast_tokens` that fits chunks of up to `max_tokens` FAST tokens: + EOS, rounded up to a
    multiple of FAST_BUDGET_MULTIPLE (headroom for chunks the fit sample missed; even sequence lengths)."""
    return -(-(max_tokens + 1) // FAST_BUDGET_MULTIPLE) * FAST_BUDGET_MULTIPLE


def resolve_fast_budget(config: Any, stats: dict | None, dataset: str | None = None) -> int:
    """Sets `config.max_fast_tokens` when it is None, or checks the value the user set, and returns it.

    `stats` are the action tokenizer's counts on the training chunks (`FASTTokenizer.stats`; None when
    there is no data to measure). The policy shares this config object (lerobot-train builds it first) and
    reads the budget only through batches and at decoding, so both agree on the value written here, and the
    checkpoint's config.json records it.
    """
    if config.action_tokenizer == "naive":
        action_dim = _action_dim(config)
        if config.max_fast_tokens is None and action_dim is not None:
            config.max_fast_tokens = naive_tokens_per_chunk(config.chunk_size, action_dim)
    elif stats is not None:
        need = int(stats["max_tokens"]) + 1  # EOS included
        sized = fast_budget_for(int(stats["max_tokens"]))
        if config.max_fast_tokens is None:
            config.max_fast_tokens = sized
            logger.info(
                "max_fast_tokens=%d: the longest FAST chunk of %s needs %d tokens (EOS included), rounded "
                "up to a multiple of %d",
                sized,
                dataset,
                need,
                FAST_BUDGET_MULTIPLE,
            )
        elif need > config.max_fast_tokens:
            message = (
                f"The FAST tokenizer needs up to {need} tokens per action chunk (EOS included) on the "
                f"training data {dataset}, but max_fast_tokens={config.max_fast_tokens}"
            )
            if config.fast_overflow == "error":
                # Would otherwise stop training at the first batch holding such a chunk.
                raise ValueError(
                    f"{message}. Pass --policy.max_fast_tokens={sized} (or leave the flag out: it is then "
                    "sized from the data), shorten --policy.chunk_size, or pass "
                    "--policy.fast_overflow=truncate."
                )
            logger.warning("%s: chunks over it are truncated (fast_overflow=truncate).", message)
    if config.max_fast_tokens is None:  # nothing to measure: a pretrained FAST or a hand-made pipeline
        config.max_fast_tokens = DEFAULT_MAX_FAST_TOKENS
        logger.info("max_fast_tokens=%d (default: no training data to size it from)", DEFAULT_MAX_FAST_TOKENS)
    return config.max_fast_tokens


def _action_dim(config: Any) -> int | None:
    """The dataset's action dim (before padding to max_action_dim), when the config knows it."""
    return config.output_features[ACTION].shape[0] if ACTION in config.output_features else None


def _check_shape(tok: ActionTokenizer, config: Any) -> None:
    action_dim = _action_dim(config)
    if tok.chunk_size is not None and tok.chunk_size != config.chunk_size:
        raise ValueError(
            f"The FAST tokenizer was fitted on chunks of {tok.chunk_size} steps but chunk_size="
            f"{config.chunk_size}: refit it (lerobot-ki-fit-fast) or set "
            f"--policy.chunk_size={tok.chunk_size}."
        )
    if tok.action_dim is not None and action_dim is not None and tok.action_dim != action_dim:
        raise ValueError(
            f"The FAST tokenizer was fitted on {tok.action_dim}-dim actions but the dataset's are "
            f"{action_dim}-dim: refit it on this dataset."
        )
