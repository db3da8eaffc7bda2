"""FAST action tokenizer (Pertsch et al. 2025): DCT over time, quantize, then byte-pair encode.

An action chunk (T, D), normalized to roughly [-1, 1], becomes a short list of integer ids:

    x (T, D) --DCT-II over time, ortho--> c (T, D) --round(c * scale)--> q (T, D) int
      --row-major flatten (freq 0: dims 0..D-1, freq 1: ...)--> (T*D,) int
      --one character per integer--> str --BPE--> ids

Low frequencies come first, so the (mostly zero) high-frequency tail of smooth chunks is a long run of
identical characters that BPE merges into a few tokens.

Two on-disk layouts are read by one code path; they differ only in how an integer k becomes a character:
  * ours (``fast_config.json`` + ``tokenizer.json``): chr(char_base + k - min_token), char_base = 0x100 so
    no control/whitespace characters appear, no pre-tokenizer, a Fuse decoder.
  * the public ``physical-intelligence/fast`` layout (``processor_config.json`` + a transformers
    ``tokenizer.json``): chr(k - min_token), i.e. char_base = 0, with a byte-level BPE pipeline; we run
    whatever pre-tokenizer/decoder its ``tokenizer.json`` declares, so ids match the public processor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.fft import dct, idct
from tokenizers import Tokenizer, decoders, models, trainers

logger = logging.getLogger(__name__)

OWN_CONFIG = "fast_config.json"
PUBLIC_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
# 0x100 skips ASCII/Latin-1 control and whitespace characters; everything must stay below the UTF-16
# surrogate block, which is not a valid code point for a Python/Rust string.
OWN_CHAR_BASE = 0x100
_SURROGATE_START = 0xD800
_PAD_ID = -1
_FORMAT = "lerobot_ki.fast/v1"

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


class FASTDecodeError(ValueError):
    """Token ids that cannot be turned back into an action chunk (bad id, wrong length, bad value)."""


def encode_input(chunks: ArrayLike, chunk_size: int | None, action_dim: int | None) -> np.ndarray:
    """(B, T, D) or (T, D) finite chunks -> a float64 (B, T, D) array; what any action tokenizer encodes."""
    x = to_float64(chunks)
    if x.ndim == 2:
        x = x[None]  # (1, T, D)
    t, d = chunk_size, action_dim
    if x.ndim != 3 or (t is not None and x.shape[1] != t) or (d is not None and x.shape[2] != d):
        raise ValueError(
            f"encode expects action chunks of shape (B, {t or 'T'}, {d or 'D'}) or "
            f"({t or 'T'}, {d or 'D'}); got shape {tuple(x.shape)}"
        )
    check_finite(x, "encode chunks")
    return x


def to_float64(chunks: ArrayLike) -> np.ndarray:
    # torch tensors may live on GPU or be bfloat16 (no numpy equivalent): cast on the torch side first.
    if isinstance(chunks, torch.Tensor):
        return chunks.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(chunks, dtype=np.float64)


def check_finite(x: np.ndarray, what: str) -> None:
    n_nan = int(np.isnan(x).sum())
    n_inf = int(np.isinf(x).sum())
    if n_nan or n_inf:
        raise ValueError(f"{what} contain non-finite values: {n_nan} NaN and {n_inf} Inf")


def id_rows(token_ids: ArrayLike) -> list[list[int]]:
    """Token id rows (ragged lists, or a 2-D array/tensor right-padded with -1) -> lists without padding."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
            raise ValueError(
                f"token ids must be a 2-D integer array; got {token_ids.dtype} {token_ids.shape}"
            )
        token_ids = token_ids.tolist()
    rows = []
    for row in token_ids:
        row = [int(k) for k in row]
        while row and row[-1] == _PAD_ID:  # strip right padding; a -1 elsewhere is a bad id
            row.pop()
        rows.append(row)
    return rows


def _dct_quantize(x: np.ndarray, scale: float) -> np.ndarray:
    """(B, T, D) float -> (B, T, D) rounded float DCT coefficients (still float so huge values cannot
    overflow an int cast before the caller clips them)."""
    return np.rint(dct(x, type=2, norm="ortho", axis=1) * scale)


class ClipCounter:
    """Counts the values an action tokenizer's `encode` clipped, so that a long training run logs
    out-of-range data instead of crashing on it, and warns through `_warn_clipping` on the 1st, 2nd, 4th,
    8th ... clipping call so that the log is not flooded. The subclass's `__init__` sets the counters."""

    clipped_total: int  # values clipped over all encode calls
    last_encode_clipped: int  # same, for the latest encode call only
    _clip_events: int  # encode calls that clipped anything

    def _record_clipping(self, count: int) -> None:
        self.last_encode_clipped = count
        if count == 0:
            return
        self.clipped_total += count
        self._clip_events += 1
        if self._clip_events & (self._clip_events - 1) == 0:
            self._warn_clipping(count)

    def _warn_clipping(self, count: int) -> None:
        raise NotImplementedError


class FASTTokenizer(ClipCounter):
    """DCT + BPE action tokenizer. Build with :meth:`fit` or :meth:`from_pretrained`."""

    kind = "fast"  # `--policy.action_tokenizer` value (the other is `naive_tokens.NaiveActionTokenizer`)

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        scale: float,
        min_token: int,
        max_token: int,
        chunk_size: int | None,
        action_dim: int | None,
        char_base: int,
        configured_vocab_size: int | None = None,
    ) -> None:
        # Padding/truncation settings saved with a transformers tokenizer would silently change ids.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.max_token = int(max_token)
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.char_base = int(char_base)
        self.vocab_size = tokenizer.get_vocab_size()
        self.configured_vocab_size = configured_vocab_size or self.vocab_size
        # Counters so a long training run can log out-of-range data instead of crashing on it.
        self.clipped_total = 0  # integers clipped into [min_token, max_token] over all encode calls
        self.last_encode_clipped = 0  # same, for the latest encode call only
        self._clip_events = 0  # encode calls that clipped anything (drives warning rate limiting)
        self.last_decode_failures: list[int] = []  # rows zero-filled by the latest decode(strict=False)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        chunks: ArrayLike,
        *,
        vocab_size: int = 1024,
        scale: float = 10.0,
        show_progress: bool = False,
    ) -> FASTTokenizer:
        """Fit on normalized action chunks (N, T, D). Same data -> byte-identical saved files."""
        x = to_float64(chunks)  # (N, T, D)
        if x.ndim != 3:
            raise ValueError(f"fit expects chunks of shape (N, T, D); got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"fit needs a non-empty dataset; got shape {x.shape}")
        check_finite(x, "fit chunks")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number; got {scale}")
        n, t, d = x.shape
        q = _dct_quantize(x, scale).reshape(n, t * d)  # (N, T*D), row-major = low frequencies first
        lo, hi = int(q.min()), int(q.max())
        alphabet_size = hi - lo + 1
        if alphabet_size > vocab_size:
            # Every integer in [lo, hi] needs its own base token, otherwise it could not be encoded.
            raise ValueError(
                f"quantized DCT range [{lo}, {hi}] needs {alphabet_size} base tokens > vocab_size "
                f"{vocab_size}; increase vocab_size, lower scale or check the action normalization"
            )
        if OWN_CHAR_BASE + alphabet_size > _SURROGATE_START:
            raise ValueError(f"quantized DCT range [{lo}, {hi}] is too wide to map to characters")
        offset = OWN_CHAR_BASE - lo

        def texts() -> Any:
            for row in q.astype(np.int64):
                yield "".join(map(chr, (row + offset).tolist()))

        # No pre-tokenizer: the whole chunk is one "word", so merges may span frequency rows.
        tok = Tokenizer(models.BPE())
        tok.decoder = decoders.Fuse()  # default decode would join tokens with spaces
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=show_progress,
            special_tokens=[],
            # The full integer range, not just what happened to occur, so each value is encodable.
            initial_alphabet=[chr(OWN_CHAR_BASE + i) for i in range(alphabet_size)],
        )
        tok.train_from_iterator(texts(), trainer=trainer, length=n)
        return cls(
            tok,
            scale=scale,
            min_token=lo,
            max_token=hi,
            chunk_size=t,
            action_dim=d,
            char_base=OWN_CHAR_BASE,
            configured_vocab_size=vocab_size,
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, chunks: ArrayLike) -> list[list[int]]:
        """(B, T, D) or (T, D) chunks -> one list of token ids per chunk."""
        x = encode_input(chunks, self.chunk_size, self.action_dim)  # (B, T, D)
        b = x.shape[0]
        q = _dct_quantize(x, self.scale).reshape(b, -1)  # (B, T*D)
        # Values never seen at fit time have no base token: clip and count rather than crash.
        outside = int(((q < self.min_token) | (q > self.max_token)).sum())
        q = np.clip(q, self.min_token, self.max_token).astype(np.int64)
        self._record_clipping(outside)
        offset = self.char_base - self.min_token
        texts = ["".join(map(chr, (row + offset).tolist())) for row in q]
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _warn_clipping(self, count: int) -> None:
        logger.warning(
            "FAST encode clipped %d DCT integers into the fit range [%d, %d] "
            "(%d clipped in total over %d calls); actions may be outside the normalized range",
            count,
            self.min_token,
            self.max_token,
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
        """Token id rows -> (B, T, D) float32 actions.

        Rows may be ragged or right-padded with -1. A row that cannot be decoded (id outside
        [0, vocab_size), wrong number of integers, value outside the fit range) raises
        FASTDecodeError when strict, else becomes zeros and its index goes to last_decode_failures.
        """
        t = chunk_size or self.chunk_size
        d = action_dim or self.action_dim
        if t is None or d is None:
            raise ValueError("chunk_size and action_dim are unknown: pass them to decode()")
        rows = id_rows(token_ids)
        self.last_decode_failures = []
        coeffs = np.zeros((len(rows), t, d), dtype=np.float64)  # (B, T, D) quantized DCT
        good: list[int] = []
        for i, row in enumerate(rows):
            bad = [k for k in row if not 0 <= k < self.vocab_size]
            if bad:
                self._fail(i, f"token id {bad[0]} outside [0, {self.vocab_size})", strict)
            else:
                good.append(i)
        texts = self._tokenizer.decode_batch([rows[i] for i in good], skip_special_tokens=False)
        span = self.max_token - self.min_token
        for i, text in zip(good, texts, strict=True):
            codes = np.fromiter(map(ord, text), dtype=np.int64, count=len(text)) - self.char_base
            if codes.size != t * d:
                self._fail(
                    i, f"decoded {codes.size} integers, expected chunk_size*action_dim={t * d}", strict
                )
            elif codes.min() < 0 or codes.max() > span:
                self._fail(
                    i, f"decoded value outside the fit range [{self.min_token}, {self.max_token}]", strict
                )
            else:
                coeffs[i] = (codes + self.min_token).reshape(t, d)
        # Failed rows stay all-zero coefficients, and the inverse DCT of zeros is a zero action chunk.
        actions = idct(coeffs / self.scale, type=2, norm="ortho", axis=1)  # (B, T, D)
        return actions.astype(np.float32)

    def _fail(self, row: int, message: str, strict: bool) -> None:
        if strict:
            raise FASTDecodeError(f"cannot decode row {row}: {message}")
        self.last_decode_failures.append(row)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _FORMAT,
            "scale": self.scale,
            "vocab_size": self.vocab_size,
            "configured_vocab_size": self.configured_vocab_size,
            "min_token": self.min_token,
            "max_token": self.max_token,
            "chunk_size": self.chunk_size,
            "action_dim": self.action_dim,
            "char_base": self.char_base,
        }
        # sort_keys + fixed indent keep the file byte-identical for identical fits.
        (path / OWN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._tokenizer.save(str(path / TOKENIZER_FILE), pretty=True)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        action_dim: int | None = None,
    ) -> FASTTokenizer:
        """Load our layout, or the public physical-intelligence/fast layout (whose processor_config.json
        usually leaves time_horizon/action_dim null: pass chunk_size/action_dim here or to decode)."""
        path = Path(directory)
        if (path / OWN_CONFIG).is_file():
            cfg = json.loads((path / OWN_CONFIG).read_text(encoding="utf-8"))
            tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
            return cls(
                tok,
                scale=cfg["scale"],
                min_token=cfg["min_token"],
                max_token=cfg["max_token"],
                chunk_size=chunk_size or cfg["chunk_size"],
                action_dim=action_dim or cfg["action_dim"],
                char_base=cfg["char_base"],
                configured_vocab_size=cfg.get("configured_vocab_size"),
            )
        if (path / PUBLIC_CONFIG).is_file():
            return cls._from_public(path, chunk_size, action_dim)
        raise FileNotFoundError(
            f"{path} has neither {OWN_CONFIG} (lerobot_ki layout) nor {PUBLIC_CONFIG} (public)"
        )

    @classmethod
    def _from_public(cls, path: Path, chunk_size: int | None, action_dim: int | None) -> FASTTokenizer:
        cfg = json.loads((path / PUBLIC_CONFIG).read_text(encoding="utf-8"))
        # The Hub repo stores the BPE flat; ProcessorMixin.save_pretrained may nest it
        # under the attribute name.
        candidates = [path / TOKENIZER_FILE, path / "bpe_tokenizer" / TOKENIZER_FILE]
        tok_file = next((c for c in candidates if c.is_file()), None)
        if tok_file is None:
            raise FileNotFoundError(f"public FAST layout at {path} has no {TOKENIZER_FILE}")
        tok = Tokenizer.from_file(str(tok_file))
        min_token = int(cfg["min_token"])
        # The public config does not store max_token. Its fit puts chr(0..max-min) into the vocab as
        # single-character tokens, so the highest single-character code point recovers the range.
        top = max(ord(s) for s in tok.get_vocab() if len(s) == 1)
        return cls(
            tok,
            scale=cfg.get("scale", 10),
            min_token=min_token,
            max_token=int(cfg.get("max_token", min_token + top)),
            chunk_size=chunk_size or cfg.get("time_horizon"),
            action_dim=action_dim or cfg.get("action_dim"),
            char_base=0,  # public convention: integer k <-> chr(k - min_token)
            configured_vocab_size=cfg.get("vocab_size"),
        )

    # ------------------------------------------------------------------ diagnostics

    def stats(self, chunks: ArrayLike) -> dict[str, float | int]:
        """Compression and reconstruction statistics over (N, T, D) chunks, for logging."""
        x = to_float64(chunks)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] == 0:
            raise ValueError(f"stats expects a non-empty (N, T, D) batch; got shape {x.shape}")
        ids = self.encode(x)
        lengths = np.array([len(r) for r in ids], dtype=np.float64)  # (N,)
        err = np.abs(self.decode(ids, chunk_size=x.shape[1], action_dim=x.shape[2]) - x)  # (N, T, D)
        return {
            "num_chunks": len(ids),
            "vocab_size": self.vocab_size,
            "mean_tokens": float(lengths.mean()),
            "p99_tokens": float(np.percentile(lengths, 99)),
            "max_tokens": int(lengths.max()),
            "recon_mae": float(err.mean()),
            "recon_max_abs": float(err.max()),
        }

    def __repr__(self) -> str:
        return (
            f"FASTTokenizer(vocab_size={self.vocab_size}, scale={self.scale}, chunk_size={self.chunk_size}, "
            f"action_dim={self.action_dim}, tokens=[{self.min_token}, {self.max_token}])"
        )
