"""Bad input gets a clear error that names the problem and the fix, never silent damage."""

from __future__ import annotations

import logging

import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature
from synthetic_dataset import make_dataset
from tiny_setup import CAMERAS, build, tiny_config

from lerobot_ki.fast_artifacts import fast_to_tensor
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import make_ki_vla_pre_post_processors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs") / "ds"
    make_dataset(root, episodes=3, length=12)
    return build(root)


def _raw(ds, indices=(0, 1)):
    return torch.utils.data.default_collate([ds[i] for i in indices])


def _obs(raw):
    return {k: v for k, v in raw.items() if not k.startswith("action")}


def test_missing_camera(setup):
    policy, pre, _, ds = setup
    batch = pre(_obs(_raw(ds)))
    del batch[CAMERAS[1]]
    with pytest.raises(ValueError, match=r"missing from the observation.*--rename_map"):
        policy.predict_action_chunk(batch)


def test_missing_state(setup):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    del obs["observation.state"]
    with pytest.raises(ValueError, match="needs 'observation.state'"):
        pre(obs)


def test_state_wider_than_config(setup):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    obs["observation.state"] = torch.zeros(2, 9)
    # The normalizer sees the width mismatch first or our prompt step does; either names the size.
    with pytest.raises((ValueError, RuntimeError), match=r"max_state_dim|size|shape"):
        pre(obs)


def test_config_rejects_wide_state_and_action():
    cfg = tiny_config()
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (12,))
    with pytest.raises(ValueError, match="--policy.max_state_dim=12"):
        cfg.validate_features()
    cfg = tiny_config()
    cfg.output_features["action"] = PolicyFeature(FeatureType.ACTION, (9,))
    with pytest.raises(ValueError, match="--policy.max_action_dim=9"):
        cfg.validate_features()


def test_action_wider_than_max(setup):
    policy, pre, _, ds = setup
    batch = pre(_raw(ds))
    batch["action"] = torch.zeros(2, 10, 9)
    with pytest.raises(ValueError, match="max_action_dim"):
        policy.forward(batch)


@pytest.mark.parametrize("key", ["observation.state", "action", CAMERAS[0]])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_anywhere(setup, key, bad):
    policy, pre, _, ds = setup
    raw = _raw(ds)
    raw[key] = raw[key].clone()
    raw[key].view(-1)[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        policy.forward(pre(raw))


@pytest.mark.parametrize("task", ["", "   "])
def test_empty_task(setup, task):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    obs["task"] = [task, "lift the green cube"]
    with pytest.raises(ValueError, match="Empty task string"):
        pre(obs)


def test_prompt_longer_than_budget(setup):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    obs["task"] = ["a very long instruction " * 10] * 2
    with pytest.raises(ValueError, match="--policy.tokenizer_max_length"):
        pre(obs)


def test_chunk_over_fast_budget_errors_or_truncates_with_count(setup, caplog):
    policy, _, _, ds = setup
    cfg = policy.config
    stats = ds.meta.stats
    cfg.max_fast_tokens = 3
    pre_err, _ = make_ki_vla_pre_post_processors(cfg, stats, fast_tokenizer=policy.fast_tokenizer)
    with pytest.raises(ValueError, match=r"max_fast_tokens=3.*fast_overflow=truncate"):
        pre_err(_raw(ds))
    cfg.fast_overflow = "truncate"
    pre_trunc, _ = make_ki_vla_pre_post_processors(cfg, stats, fast_tokenizer=policy.fast_tokenizer)
    with caplog.at_level(logging.WARNING):
        batch = pre_trunc(_raw(ds))
    fast_step = next(s for s in pre_trunc.steps if type(s).__name__ == "KIFastTokenizerStep")
    assert fast_step.num_truncated == 2 and "truncated" in caplog.text
    assert (
        batch["action.token_mask"].shape[1] == 3
        and batch["action.tokens"][0, 2] == policy.model.layout.eos_id
    )
    cfg.max_fast_tokens, cfg.fast_overflow = 40, "error"


def test_stats_without_quantiles(setup):
    policy, _, _, ds = setup
    stats = {k: {s: v for s, v in d.items() if s not in ("q01", "q99")} for k, d in ds.meta.stats.items()}
    with pytest.raises(ValueError, match=r"lack \['q01', 'q99'\].*augment_dataset_quantile_stats"):
        make_ki_vla_pre_post_processors(policy.config, stats)


def test_checkpoint_of_another_policy(tmp_path):
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    cfg = ACTConfig(
        pretrained_backbone_weights=None,
        device="cpu",
        dim_model=32,
        n_encoder_layers=1,
        n_decoder_layers=1,
        dim_feedforward=64,
        chunk_size=5,
        n_action_steps=5,
    )
    cfg.input_features = {
        "observation.state": PolicyFeature(FeatureType.STATE, (4,)),
        CAMERAS[0]: PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
    }
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (3,))}
    ACTPolicy(cfg).save_pretrained(tmp_path / "act")
    with pytest.raises(ValueError, match=r"holds a 'act' policy, not 'ki_vla'.*--policy.type=act"):
        KIPolicy.from_pretrained(tmp_path / "act")


def test_missing_weights_in_a_ki_checkpoint_are_an_error(setup, tmp_path):
    """A truncated/foreign model.safetensors must not load silently (LeRobot's default is strict=False)."""
    from safetensors.torch import load_file, save_file

    policy, _, _, _ = setup
    policy.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights.pop("model.action_out_proj.weight")
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(RuntimeError, match="action_out_proj"):
        KIPolicy.from_pretrained(tmp_path / "ckpt")


def test_undecodable_fast_sequences_are_counted_or_raise(setup, caplog):
    """An untrained backbone emits token sequences that do not decode to a (T, A) chunk: zero chunks
    with a counted warning by default, an error past `fast_decode_max_failures`."""
    from lerobot_ki.fast import FASTDecodeError

    policy, pre, _, ds = setup
    batch = pre(_obs(_raw(ds, (0, 1, 2, 3))))
    policy.config.inference_mode = "fast"
    policy.num_fast_decode_failures = 0
    try:
        with caplog.at_level(logging.WARNING):
            chunk = policy.predict_action_chunk(batch)
        failures = policy.num_fast_decode_failures
        assert failures > 0 and "did not decode" in caplog.text
        assert chunk.shape == (4, 10, 3) and torch.isfinite(chunk).all()
        policy.config.fast_decode_max_failures = failures
        with pytest.raises(FASTDecodeError, match="undecodable"):
            policy.predict_action_chunk(batch)
    finally:
        policy.config.inference_mode, policy.config.fast_decode_max_failures = "flow", -1


def test_fast_decoding_without_the_tokenizer_says_where_it_is_saved(setup, tmp_path):
    policy, pre, _, ds = setup
    policy.save_pretrained(tmp_path)  # the weights alone: the FAST tokenizer is the preprocessor's state
    loaded = KIPolicy.from_pretrained(tmp_path)
    assert loaded.fast_tokenizer is None
    loaded.config.inference_mode = "fast"
    with pytest.raises(ValueError, match="saved with the preprocessor"):
        loaded.predict_action_chunk(pre(_obs(_raw(ds))))
    pre.save_pretrained(tmp_path)  # with it, from_pretrained finds the one saved copy
    reloaded = KIPolicy.from_pretrained(tmp_path).fast_tokenizer
    assert torch.equal(fast_to_tensor(reloaded), fast_to_tensor(policy.fast_tokenizer))
