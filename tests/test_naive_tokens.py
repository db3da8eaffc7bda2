"""`--policy.action_tokenizer=naive`: 256 uniform bins per normalized action value (the paper's ablation of
FAST), through the same FAST step, checkpoint state and `inference_mode=fast` decoding as FAST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import logged_metric, run_logged, venv_script
from lerobot.lerobot_types import TransitionKey
from lerobot.policies.factory import make_pre_post_processors
from lerobot.utils.constants import ACTION, ACTION_TOKEN_MASK, ACTION_TOKENS
from safetensors.torch import load_file
from synthetic_dataset import ACTION_DIM
from tiny_setup import batch_of, load_dataset, tiny_config, train_steps

from lerobot_ki.fast import FASTDecodeError
from lerobot_ki.fast_artifacts import fast_from_tensor, fast_to_tensor
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.naive_tokens import NaiveActionTokenizer
from lerobot_ki.processor_ki import (
    KIFastTokenizerStep,
    fast_tokenizer_of_checkpoint,
    make_ki_vla_pre_post_processors,
)
from lerobot_ki.vocabulary import PALIGEMMA_LOC_IDS, vocab_layout

T, D = 10, ACTION_DIM
HALF_BIN = 1.0 / 256  # 256 bins over [-1, 1] are 2/256 wide


def chunks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, T, D))


# --- the tokenizer -----------------------------------------------------------------------------------


def test_round_trip_within_half_a_bin_and_clipping():
    tok = NaiveActionTokenizer(T, D)
    x = chunks(16)
    x[0, 0] = [-1.0, 0.0, 1.0]  # both ends of the range and the middle
    ids = tok.encode(x)
    recon = tok.decode(ids)
    assert recon.shape == (16, T, D) and recon.dtype == np.float32
    assert np.abs(recon - x).max() <= HALF_BIN + 1e-6
    assert ids[0][:3] == [0, 128, 255]
    assert tok.last_encode_clipped == 0
    # Out of range: clipped to the end bins, counted.
    y = x.copy()
    y[1, 2] = [-3.0, 1.5, 7.0]
    ids_y = tok.encode(y)
    assert ids_y[1][2 * D : 3 * D] == [0, 255, 255]
    np.testing.assert_allclose(
        tok.decode(ids_y)[1, 2], [-1 + HALF_BIN, 1 - HALF_BIN, 1 - HALF_BIN], atol=1e-6
    )
    assert tok.last_encode_clipped == 3 and tok.clipped_total == 3


def test_one_token_per_value_row_major():
    tok = NaiveActionTokenizer(T, D)
    x = np.zeros((1, T, D))
    x[0, :, 0] = np.linspace(-0.9, 0.9, T)  # dim 0 rises over the steps, dims 1 and 2 are fixed
    x[0, :, 1], x[0, :, 2] = -0.5, 0.5
    (row,) = tok.encode(x)
    assert len(row) == T * D
    expected = np.floor((x[0] + 1) / 2 * 256).astype(int)  # (T, D)
    assert row == expected.reshape(-1).tolist()
    assert row[1::D] == [64] * T and row[2::D] == [192] * T  # step t, dim d is token t*D + d
    assert row[0::D] == sorted(row[0::D]) and row[0] < row[(T - 1) * D]


@pytest.mark.parametrize("text_tokenizer", ["byte", "paligemma"])
def test_step_writes_chunk_plus_eos_in_the_fast_slot(text_tokenizer):
    layout = vocab_layout(text_tokenizer, 256)
    step = KIFastTokenizerStep.for_layout(
        layout, max_fast_tokens=T * D + 1, fast_tokenizer=NaiveActionTokenizer(T, D)
    )
    x = torch.as_tensor(chunks(4, seed=1), dtype=torch.float32)
    x[0, 0, 0], x[0, 0, 1] = -1.0, 1.0  # bins 0 and 255: both ends of the slot
    out = step({TransitionKey.ACTION: x, TransitionKey.COMPLEMENTARY_DATA: {}})
    ids = out[TransitionKey.COMPLEMENTARY_DATA][ACTION_TOKENS]
    mask = out[TransitionKey.COMPLEMENTARY_DATA][ACTION_TOKEN_MASK]
    assert ids.shape == (4, T * D + 1) and mask.all()
    assert (ids[:, -1] == layout.eos_id).all()
    lo, hi = layout.fast_lm_range()
    body = ids[:, :-1]
    assert ((body >= lo) & (body < hi)).all()
    # Back through the layout: the bins themselves, i.e. the same ids FAST token ids would have.
    assert layout.lm_to_fast(body).tolist() == NaiveActionTokenizer(T, D).encode(x)
    assert {layout.fast_to_lm([0])[0], layout.fast_to_lm([255])[0]} <= set(body.flatten().tolist())
    if text_tokenizer == "paligemma":
        assert body.max() < PALIGEMMA_LOC_IDS.start  # below <loc>, as FAST
    else:
        assert body.min() >= layout.text_vocab_size  # after the byte tokenizer's own ids


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_rejected(value, word):
    x = chunks(2)
    x[1, 3, 2] = value
    with pytest.raises(ValueError, match=word):
        NaiveActionTokenizer(T, D).encode(x)


def test_decode_rejects_bad_rows():
    tok = NaiveActionTokenizer(T, D)
    good = tok.encode(chunks(1))[0]
    with pytest.raises(FASTDecodeError, match="expected chunk_size"):
        tok.decode([good[:-1]])
    with pytest.raises(FASTDecodeError, match="outside"):
        tok.decode([[*good[:-1], 256]])
    out = tok.decode([good, good[:5], [*good[:-1], -7]], strict=False)
    assert tok.last_decode_failures == [1, 2]
    assert (out[1:] == 0).all() and np.abs(out[0]).max() > 0
    # Right padding with -1 (what the policy's decode hands over) is stripped.
    np.testing.assert_array_equal(tok.decode([[*good, -1, -1]]), tok.decode([good]))


def test_travels_as_a_tensor_like_fast():
    tok = NaiveActionTokenizer(T, D)
    back = fast_from_tensor(fast_to_tensor(tok))
    assert isinstance(back, NaiveActionTokenizer)
    assert (back.chunk_size, back.action_dim, back.bins) == (T, D, 256)
    x = chunks(3)
    assert back.encode(x) == tok.encode(x)


# --- the config --------------------------------------------------------------------------------------


def test_budget_and_vocabulary_checked_at_startup():
    # 10 steps x 3 dims + EOS = 31 tokens.
    with pytest.raises(
        ValueError, match=r"31 tokens per chunk.*max_fast_tokens=30.*--policy\.max_fast_tokens=31"
    ):
        KIPolicy(tiny_config(action_tokenizer="naive", max_fast_tokens=30))
    tiny_config(action_tokenizer="naive", max_fast_tokens=31).validate_features()  # fits exactly
    tiny_config(action_tokenizer="fast", max_fast_tokens=30).validate_features()  # FAST: no such bound
    with pytest.raises(ValueError, match=r"--policy\.fast_vocab_size=256"):
        tiny_config(action_tokenizer="naive", fast_vocab_size=128)
    with pytest.raises(ValueError, match="fast_tokenizer_path"):
        tiny_config(action_tokenizer="naive", fast_tokenizer_path="/some/fast")
    with pytest.raises(ValueError, match="action_tokenizer"):
        tiny_config(action_tokenizer="bins")


# --- a tiny policy: train, save, reload, decode --------------------------------------------------------


def test_train_save_reload_and_fast_decode(dataset_root, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(action_tokenizer="naive")
    ds = load_dataset(dataset_root, cfg.chunk_size)
    # No fast_tokenizer handed over and no dataset to fit on: naive bins need neither.
    policy = KIPolicy(cfg, dataset_stats=ds.meta.stats)
    pre, post = make_ki_vla_pre_post_processors(cfg, ds.meta.stats)
    assert isinstance(policy.fast_tokenizer, NaiveActionTokenizer)
    batch = batch_of(ds, pre, range(4))
    assert batch[ACTION_TOKEN_MASK].sum(1).tolist() == [T * D + 1] * 4
    history = train_steps(policy, [batch], 3)
    assert all(math.isfinite(h["loss_fast_ce"]) and math.isfinite(h["loss_flow"]) for h in history)
    assert history[-1]["loss_fast_ce"] < history[0]["loss_fast_ce"]

    out = tmp_path / "ckpt"
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    loaded = KIPolicy.from_pretrained(out)
    pre_l, _ = make_pre_post_processors(loaded.config, pretrained_path=str(out))
    assert loaded.config.action_tokenizer == "naive"
    assert isinstance(loaded.fast_tokenizer, NaiveActionTokenizer)
    assert (loaded.fast_tokenizer.chunk_size, loaded.fast_tokenizer.action_dim) == (T, D)
    step = next(s for s in pre_l.steps if isinstance(s, KIFastTokenizerStep))
    assert isinstance(step.fast_tokenizer, NaiveActionTokenizer)
    assert torch.equal(batch_of(ds, pre_l, range(4))[ACTION_TOKENS], batch[ACTION_TOKENS])

    loaded.config.inference_mode = "fast"
    obs = batch_of(ds, pre_l, [0, 7])
    actions = loaded.predict_action_chunk(obs)
    assert actions.shape == (2, T, D) and torch.isfinite(actions).all()
    # Every row is either bin centres (a decoded chunk) or a counted zero chunk.
    centres = (actions + 1) * 128 - 0.5
    decoded = torch.isclose(centres, centres.round(), atol=1e-3).all(dim=(1, 2))
    zero = (actions == 0).all(dim=(1, 2))
    assert (decoded | zero).all()
    assert loaded.num_fast_decode_failures == int((zero & ~decoded).sum())

    # The decode path itself, with the backbone's answer fixed to the LM ids of known chunks.
    target = batch[ACTION_TOKENS][:2]
    loaded.model.generate = lambda *args, **kwargs: target
    actions = loaded.predict_action_chunk(obs)
    expected = NaiveActionTokenizer(T, D).decode(NaiveActionTokenizer(T, D).encode(batch[ACTION][:2]))
    torch.testing.assert_close(actions, torch.as_tensor(expected))
    # Quantile-normalized actions may leave [-1, 1] a little: those were clipped to the end bins.
    assert (actions - batch[ACTION][:2].clamp(-1, 1)).abs().max() <= HALF_BIN + 1e-6


def test_checkpoint_kind_must_match_config():
    cfg = tiny_config(action_tokenizer="naive")
    policy = KIPolicy(cfg, fast_tokenizer=NaiveActionTokenizer(T, D))  # as loaded from its checkpoint
    policy.config.action_tokenizer = "fast"  # e.g. --policy.action_tokenizer=fast on a naive checkpoint
    with pytest.raises(ValueError, match="action_tokenizer=naive"):
        _ = policy.fast_tokenizer


# --- lerobot-train -----------------------------------------------------------------------------------


def test_lerobot_train_with_naive_tokens(dataset_root, offline_env, tiny_train_args, tmp_path):
    out = tmp_path / "run"
    cmd = [
        venv_script("lerobot-train"),
        *tiny_train_args(
            dataset_root,
            out,
            "--policy.action_tokenizer=naive",
            "--batch_size=2",
            "--steps=2",
            "--log_freq=1",
            "--save_freq=2",
        ),
    ]
    log = run_logged(cmd, offline_env, tmp_path / "train.log")
    assert "FAST fitted" not in log and "Naive action tokens" in log, log[-3000:]
    ce = logged_metric(log, "loss_fast_ce")
    assert len(ce) == 2 and all(math.isfinite(v) and v > 0 for v in ce)
    pm = out / "checkpoints" / "000002" / "pretrained_model"
    tok = fast_tokenizer_of_checkpoint(pm)  # the preprocessor's copy, the only one saved
    assert isinstance(tok, NaiveActionTokenizer) and (tok.chunk_size, tok.action_dim) == (T, D)
    assert "fast_tokenizer_state" not in load_file(pm / "model.safetensors")
    loaded = KIPolicy.from_pretrained(pm)
    assert loaded.config.action_tokenizer == "naive"
    assert ACTION in loaded.config.output_features
