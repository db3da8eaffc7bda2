"""Tests for the FAST action tokenizer (lerobot_ki.fast). CPU only, offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.fft import dct, idct
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lerobot_ki.fast import FASTDecodeError, FASTTokenizer

D = 7


def uniform_chunks(n: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, t, D))  # (N, T, D)


def smooth_chunks(n: int, t: int, seed: int = 0) -> np.ndarray:
    """Sums of three sines below 1.5 cycles per chunk, amplitude <= 0.9 -> (N, T, D) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, 1.0, t)[None, :, None]  # (1, T, 1)
    out = np.zeros((n, t, D))
    for _ in range(3):
        freq = rng.uniform(0.0, 1.5, (n, 1, D))
        phase = rng.uniform(0.0, 2 * np.pi, (n, 1, D))
        amp = rng.uniform(-0.3, 0.3, (n, 1, D))
        out += amp * np.sin(2 * np.pi * freq * time + phase)
    return out


def quantization_bound(t: int, scale: float) -> float:
    # Rounding moves each DCT coefficient by at most 0.5 (in units of 1/scale), i.e. 0.5/scale in
    # coefficient space. The orthonormal inverse DCT preserves the L2 norm, so for one action dim the
    # error over time has L2 norm <= sqrt(T * (0.5/scale)^2) = sqrt(T) * 0.5 / scale, and every single
    # element's |error| is at most that L2 norm. 1e-5 covers the float32 output.
    return float(np.sqrt(t) * 0.5 / scale) + 1e-5


def quantized_reference(x: np.ndarray, scale: float) -> np.ndarray:
    """What an exact decode must return: idct(round(dct(x) * scale) / scale), per the FAST definition."""
    q = np.rint(dct(x, type=2, norm="ortho", axis=1) * scale)
    return idct(q / scale, type=2, norm="ortho", axis=1)


@pytest.fixture(scope="module")
def tok10() -> FASTTokenizer:
    return FASTTokenizer.fit(uniform_chunks(200, 10), vocab_size=256)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("t", [10, 23, 50])
def test_round_trip_random_within_quantization_bound(t: int) -> None:
    x = uniform_chunks(200, t, seed=t)
    tok = FASTTokenizer.fit(x)
    assert (tok.chunk_size, tok.action_dim) == (t, D)
    assert tok.vocab_size <= 1024
    ids = tok.encode(x)
    assert len(ids) == 200 and tok.last_encode_clipped == 0
    y = tok.decode(ids)
    assert y.shape == x.shape and y.dtype == np.float32
    bound = quantization_bound(t, tok.scale)
    assert np.abs(y - x).max() <= bound
    assert np.linalg.norm(y - x, axis=1).max() <= bound  # per-dim L2 over time
    # Stronger: no information is lost beyond the rounding itself.
    np.testing.assert_allclose(y, quantized_reference(x, tok.scale), atol=1e-5)


def test_smooth_round_trip_and_compression() -> None:
    t = 50
    train, held_out = smooth_chunks(300, t, seed=1), smooth_chunks(100, t, seed=2)
    tok = FASTTokenizer.fit(train)
    y = tok.decode(tok.encode(held_out))
    assert np.abs(y - held_out).max() <= quantization_bound(t, tok.scale)
    s = tok.stats(held_out)
    # Smooth chunks put energy in a few low frequencies; the zero tail collapses under BPE.
    assert s["mean_tokens"] < 0.2 * t * D
    assert s["max_tokens"] < t * D
    assert s["recon_max_abs"] <= quantization_bound(t, tok.scale)
    assert s["num_chunks"] == 100 and s["vocab_size"] == tok.vocab_size


def test_single_chunk_and_torch_inputs(tok10: FASTTokenizer) -> None:
    x = uniform_chunks(4, 10, seed=5)
    ref = tok10.encode(x)
    assert tok10.encode(x[0]) == [ref[0]]
    assert tok10.encode(torch.from_numpy(x).float()) == tok10.encode(x.astype(np.float32))
    # bfloat16 has no numpy dtype; must still work (values change slightly, so just check it decodes).
    bf = tok10.encode(torch.from_numpy(x).to(torch.bfloat16))
    assert tok10.decode(bf).shape == (4, 10, D)
    # 2-D integer tensor right-padded with -1 decodes like the ragged list.
    width = max(len(r) for r in ref) + 3
    padded = torch.full((4, width), -1, dtype=torch.long)
    for i, r in enumerate(ref):
        padded[i, : len(r)] = torch.tensor(r)
    np.testing.assert_array_equal(tok10.decode(padded), tok10.decode(ref))
    np.testing.assert_array_equal(tok10.decode(padded.numpy()), tok10.decode(ref))


# ---------------------------------------------------------------- determinism and persistence


def test_fit_is_deterministic(tmp_path: Path) -> None:
    x = smooth_chunks(200, 30, seed=3)
    a, b = FASTTokenizer.fit(x, vocab_size=512), FASTTokenizer.fit(x.copy(), vocab_size=512)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) >= 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.encode(x) == b.encode(x)


def test_save_load_round_trip(tmp_path: Path, tok10: FASTTokenizer) -> None:
    tok10.save_pretrained(tmp_path)
    loaded = FASTTokenizer.from_pretrained(tmp_path)
    for attr in ("scale", "vocab_size", "chunk_size", "action_dim", "min_token", "max_token"):
        assert getattr(loaded, attr) == getattr(tok10, attr), attr
    x = uniform_chunks(50, 10, seed=7)
    ids = tok10.encode(x)
    assert loaded.encode(x) == ids
    np.testing.assert_array_equal(loaded.decode(ids), tok10.decode(ids))


def test_from_pretrained_missing_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        FASTTokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------- public physical-intelligence/fast layout


def _write_public_layout(
    directory: Path, chunks: np.ndarray, scale: float, vocab_size: int
) -> tuple[int, int]:
    """Write a directory the way the public repo stores its tokenizer: byte-level BPE over chr(k - min_token),
    saved through transformers.PreTrainedTokenizerFast, plus processor_config.json with null shapes."""
    transformers = pytest.importorskip("transformers")
    q = np.rint(dct(chunks, type=2, norm="ortho", axis=1) * scale).astype(np.int64).reshape(len(chunks), -1)
    lo, hi = int(q.min()), int(q.max())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=[chr(i) for i in range(hi - lo + 1)],
        max_token_length=10000,
        show_progress=False,
    )
    bpe.train_from_iterator(("".join(chr(k - lo) for k in row) for row in q.tolist()), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(directory))
    config = {
        "action_dim": None,
        "auto_map": {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"},
        "min_token": lo,
        "processor_class": "UniversalActionProcessor",
        "scale": scale,
        "time_horizon": None,
        "vocab_size": vocab_size,
    }
    (directory / "processor_config.json").write_text(json.dumps(config, indent=2))
    return lo, hi


def test_reads_public_layout(tmp_path: Path) -> None:
    t, scale = 20, 100.0  # a wide integer range (> 323) like the real tokenizer's
    train = smooth_chunks(300, t, seed=4)
    lo, hi = _write_public_layout(tmp_path, train, scale=scale, vocab_size=1024)
    assert (tmp_path / "tokenizer.json").is_file()

    tok = FASTTokenizer.from_pretrained(tmp_path, chunk_size=t, action_dim=D)
    assert (tok.min_token, tok.max_token, tok.scale) == (lo, hi, scale)

    x = smooth_chunks(40, t, seed=5)
    ids = tok.encode(x)
    # Ids must equal what the public convention gives: byte-level BPE over chr(k - min_token).
    bpe = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    q = np.rint(dct(x, type=2, norm="ortho", axis=1) * scale).astype(np.int64).reshape(len(x), -1)
    q = np.clip(q, lo, hi)
    expected = [bpe.encode("".join(chr(k - lo) for k in row)).ids for row in q.tolist()]
    assert ids == expected
    y = tok.decode(ids)
    assert np.abs(y - x).max() <= quantization_bound(t, scale)

    # Null time_horizon/action_dim in the config: shapes come from the caller at decode time.
    bare = FASTTokenizer.from_pretrained(tmp_path)
    assert bare.chunk_size is None and bare.action_dim is None
    with pytest.raises(ValueError, match="chunk_size"):
        bare.decode(ids)
    np.testing.assert_array_equal(bare.decode(ids, chunk_size=t, action_dim=D), y)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("value", "word"), [(np.nan, "1 NaN"), (np.inf, "1 Inf")])
def test_non_finite_rejected(tok10: FASTTokenizer, value: float, word: str) -> None:
    x = uniform_chunks(20, 10)
    x[3, 4, 5] = value
    with pytest.raises(ValueError, match=word):
        FASTTokenizer.fit(x)
    with pytest.raises(ValueError, match=word):
        tok10.encode(x)
    with pytest.raises(ValueError, match=word):
        tok10.encode(torch.from_numpy(x))


def test_bad_shapes_and_empty(tok10: FASTTokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        FASTTokenizer.fit(np.zeros((0, 10, D)))
    with pytest.raises(ValueError, match="shape"):
        FASTTokenizer.fit(np.zeros((10, D)))
    with pytest.raises(ValueError, match=r"\(B, 10, 7\)"):
        tok10.encode(uniform_chunks(3, 11))
    with pytest.raises(ValueError, match="shape"):
        tok10.encode(np.zeros((3, 10, D + 1)))


def test_vocab_too_small_for_range() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        FASTTokenizer.fit(uniform_chunks(50, 10), vocab_size=8)


def test_out_of_range_actions_are_clipped_and_counted(tok10: FASTTokenizer, caplog) -> None:
    x = uniform_chunks(2, 10)
    x[1] = 50.0  # far outside the normalized range seen at fit time
    before = tok10.clipped_total
    with caplog.at_level(logging.WARNING, logger="lerobot_ki.fast"):
        ids = tok10.encode(x)
    assert tok10.last_encode_clipped > 0 and tok10.clipped_total == before + tok10.last_encode_clipped
    assert any("clipped" in r.getMessage() for r in caplog.records)
    y = tok10.decode(ids)
    assert np.isfinite(y).all()
    assert np.abs(y[0] - x[0]).max() <= quantization_bound(10, tok10.scale)  # untouched row stays exact


def test_decode_rejects_ids_outside_vocab(tok10: FASTTokenizer) -> None:
    good = tok10.encode(uniform_chunks(3, 10))
    for bad_id in (tok10.vocab_size, -5):
        rows = [good[0], good[1] + [bad_id], good[2]]
        with pytest.raises(FASTDecodeError, match=str(bad_id)):
            tok10.decode(rows)
        y = tok10.decode(rows, strict=False)
        assert tok10.last_decode_failures == [1]
        assert not y[1].any()
        np.testing.assert_array_equal(y[[0, 2]], tok10.decode([good[0], good[2]]))


def test_decode_wrong_length(tok10: FASTTokenizer) -> None:
    good = tok10.encode(uniform_chunks(3, 10))
    rows = [good[0], good[1][:-1], good[2], []]
    with pytest.raises(FASTDecodeError, match="expected chunk_size"):
        tok10.decode(rows)
    y = tok10.decode(rows, strict=False)
    assert tok10.last_decode_failures == [1, 3]
    assert not y[1].any() and not y[3].any()
    assert y[0].any() and y[2].any()
    # A later clean decode resets the failure record.
    tok10.decode(good)
    assert tok10.last_decode_failures == []
