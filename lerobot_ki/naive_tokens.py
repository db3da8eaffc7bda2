"""Naive action tokens (RT-2 / OpenVLA style), the knowledge-insulation paper's ablation of FAST.

Every normalized action value is clipped to [-1, 1] and put into one of 256 uniform bins; one token per
value, row-major over the chunk (step 0: dims 0..D-1, step 1: ...), so a chunk is always T*D tokens:

    x (T, D) in [-1, 1] --floor((x + 1) / 2 * 256), clip 0..255--> (T*D,) ids;  id k -> -1 + (k + 0.5) * 2/256

Ids 0..255 take the slots of FAST ids in the backbone vocabulary (`vocabulary.py`), and the class has the
interface the rest of the package uses from `FASTTokenizer` (encode / decode / save / load / stats), so the
processor's FAST step, the checkpoint buffer and `inference_mode=fast` decoding run it unchanged. Nothing
is fitted: the tokenizer is a function of (chunk_size, action_dim).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from lerobot_ki.fast import ArrayLike, ClipCounter, FASTDecodeError, encode_input, id_rows, to_float64

logger = logging.getLogger(__name__)

NAIVE_CONFIG = "naive_tokens_config.json"
NAIVE_BINS = 256
_FORMAT = "lerobot_ki.naive/v1"


def naive_tokens_per_chunk(chunk_size: int, action_dim: int) -> int:
    """One token per action value plus EOS: the exact length of every naive chunk."""
    return chunk_size * action_dim + 1


def naive_budget_error(chunk_size: int, action_dim: int, max_fast_tokens: int | None) -> str | None:
    """Why a naive chunk (chunk_size * action_dim tokens + EOS) does not fit `max_fast_tokens`, or None
    (also when the budget is None: it is then sized to fit)."""
    need = naive_tokens_per_chunk(chunk_size, action_dim)
    if max_fast_tokens is None or need <= max_fast_tokens:
        return None
    return (
        f"action_tokenizer=naive writes one token per action value: chunk_size ({chunk_size}) x action "
        f"dims ({action_dim}) + EOS = {need} tokens per chunk, but max_fast_tokens={max_fast_tokens}. "
        f"Pass --policy.max_fast_tokens={need} (or shorten --policy.chunk_size)."
    )


class NaiveActionTokenizer(ClipCounter):
    """256 uniform bins over [-1, 1] per action value; same duck-typed interface as `FASTTokenizer`."""

    kind = "naive"

    def __init__(self, chunk_size: int | None, action_dim: int | None, bins: int = NAIVE_BINS) -> None:
        if bins < 2:
            raise ValueError(f"naive action tokens need at least 2 bins; got {bins}")
        self.bins = int(bins)
        self.vocab_size = self.bins
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.clipped_total = 0  # values clipped into [-1, 1] over all encode calls
        self.last_encode_clipped = 0
        self._clip_events = 0
        self.last_decode_failures: list[int] = []  # rows zero-filled by the latest decode(strict=False)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, chunks: ArrayLike) -> list[list[int]]:
        """(B, T, D) or (T, D) normalized chunks -> one list of T*D bin ids per chunk."""
        x = encode_input(chunks, self.chunk_size, self.action_dim)  # (B, T, D)
        self._record_clipping(int((np.abs(x) > 1.0).sum()))
        x = np.clip(x, -1.0, 1.0)
        ids = np.clip(np.floor((x + 1.0) / 2.0 * self.bins), 0, self.bins - 1).astype(np.int64)  # (B, T, D)
        return ids.reshape(ids.shape[0], -1).tolist()

    def _warn_clipping(self, count: int) -> None:
        logger.warning(
            "naive action tokens: %d normalized action values outside [-1, 1] clipped "
            "(%d in total over %d calls)",
            count,
            self.clipped_total,
            self._clip_events,
        )

    def decode(
        self,
        token_ids: ArrayLike,
        *,
        chunk_size: int | None = None,
        action_dim: int | None = None,
        strict: bool = True,
    ) -> np.ndarray:
        """Token id rows (ragged or right-padded with -1) -> (B, T, D) float32 bin centres. A row with an id
        outside [0, bins) or not exactly T*D ids raises FASTDecodeError when strict, else becomes zeros and
        its index goes to last_decode_failures."""
        t = chunk_size or self.chunk_size
        d = action_dim or self.action_dim
        if t is None or d is None:
            raise ValueError("chunk_size and action_dim are unknown: pass them to decode()")
        rows = id_rows(token_ids)
        self.last_decode_failures = []
        out = np.zeros((len(rows), t * d), dtype=np.float64)  # (B, T*D)
        for i, row in enumerate(rows):
            bad = [k for k in row if not 0 <= k < self.bins]
            if bad:
                problem = f"token id {bad[0]} outside [0, {self.bins})"
            elif len(row) != t * d:
                problem = f"{len(row)} tokens, expected chunk_size*action_dim={t * d}"
            else:
                out[i] = -1.0 + (np.asarray(row, dtype=np.float64) + 0.5) * (2.0 / self.bins)
                continue
            if strict:
                raise FASTDecodeError(f"cannot decode row {i}: {problem}")
            self.last_decode_failures.append(i)
        return out.reshape(len(rows), t, d).astype(np.float32)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _FORMAT,
            "bins": self.bins,
            "chunk_size": self.chunk_size,
            "action_dim": self.action_dim,
        }
        (path / NAIVE_CONFIG).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        action_dim: int | None = None,
    ) -> NaiveActionTokenizer:
        cfg = json.loads((Path(directory) / NAIVE_CONFIG).read_text(encoding="utf-8"))
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"{directory}/{NAIVE_CONFIG} has format {cfg.get('format')!r}, not {_FORMAT!r}")
        return cls(chunk_size or cfg["chunk_size"], action_dim or cfg["action_dim"], bins=cfg["bins"])

    # ------------------------------------------------------------------ diagnostics

    def stats(self, chunks: ArrayLike) -> dict[str, float | int]:
        """The same keys as `FASTTokenizer.stats` (token counts are constant: T*D)."""
        x = to_float64(chunks)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] == 0:
            raise ValueError(f"stats expects a non-empty (N, T, D) batch; got shape {x.shape}")
        ids = self.encode(x)
        err = np.abs(self.decode(ids, chunk_size=x.shape[1], action_dim=x.shape[2]) - x)  # (N, T, D)
        n = x.shape[1] * x.shape[2]
        return {
            "num_chunks": len(ids),
            "vocab_size": self.vocab_size,
            "mean_tokens": float(n),
            "p99_tokens": float(n),
            "max_tokens": int(n),
            "recon_mae": float(err.mean()),
            "recon_max_abs": float(err.max()),
        }

    def __repr__(self) -> str:
        return (
            f"NaiveActionTokenizer(bins={self.bins}, chunk_size={self.chunk_size}, "
            f"action_dim={self.action_dim})"
        )
