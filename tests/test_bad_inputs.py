"""Bad input gets a clear error that names the problem and the fix, never silent damage."""

from __future__ import annotations

import copy
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
    # The input check names the width before the normalizer would fail on it.
    with pytest.raises(ValueError, match=r"'observation.state' has 9 values.*expects 4"):
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


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead", "fastest"])
def test_compile_mode_that_records_its_own_cuda_graphs_is_refused_at_start_up(mode):
    # Inductor's CUDA graphs inside ki_vla's recorded call would be captured twice; a typo would only
    # surface at the first compiled call on a GPU.
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        tiny_config(compile_expert=True, compile_mode=mode)
    assert tiny_config(compile_mode="max-autotune-no-cudagraphs").compile_mode == "max-autotune-no-cudagraphs"


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


def test_fast_tokenizer_larger_than_the_reserved_vocabulary_is_refused(setup):
    policy, _, _, ds = setup
    cfg = copy.deepcopy(policy.config)
    cfg.fast_vocab_size = policy.fast_tokenizer.vocab_size - 1
    with pytest.raises(ValueError, match=rf"has {policy.fast_tokenizer.vocab_size} tokens.*fast_vocab_size="):
        make_ki_vla_pre_post_processors(cfg, ds.meta.stats, fast_tokenizer=policy.fast_tokenizer)
    cfg.fast_vocab_size = policy.fast_tokenizer.vocab_size  # exactly enough slots: accepted
    make_ki_vla_pre_post_processors(cfg, ds.meta.stats, fast_tokenizer=policy.fast_tokenizer)


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
    # Read only when fast decoding needs it: flow inference works even if the preprocessor is unreadable
    # (e.g. an offline cache that holds only the weights).
    (tmp_path / "policy_preprocessor.json").write_text("not json")
    flow_only = KIPolicy.from_pretrained(tmp_path)
    flow_only.config.inference_mode = "flow"
    assert torch.isfinite(flow_only.predict_action_chunk(pre(_obs(_raw(ds))))).all()


# --- caught by the preprocessor's input check, before LeRobot's normalizer ------------------------------


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (lambda img: (img * 255).to(torch.uint8), r"torch.uint8.*float images in \[0, 1\], channels first"),
        (lambda img: img * 255, r"has values in \[30, 220\].*float images in \[0, 1\].*/ 255"),
        (lambda img: img * 2 - 1, r"has values in \[-0.765, 0.725\].*float images in \[0, 1\]"),
        (lambda img: img.permute(0, 2, 3, 1), r"\(2, 32, 32, 3\).*channels first \(B, 3, H, W\)"),
        (lambda img: img[..., :3], r"32x3 pixels.*at least 5x5"),
    ],
    ids=["uint8", "0_255", "minus1_1", "channels_last", "3px_wide"],
)
def test_bad_camera_format_is_named(setup, image, match):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    obs[CAMERAS[1]] = image(obs[CAMERAS[1]])
    with pytest.raises(ValueError, match=rf"Camera '{CAMERAS[1]}'.*{match}"):
        pre(obs)


def test_state_width_is_checked_before_the_normalizer(setup):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds))
    obs["observation.state"] = torch.zeros(2, 3)  # the policy was trained on 4 values
    with pytest.raises(ValueError, match=r"'observation.state' has 3 values.*expects 4"):
        pre(obs)


@pytest.mark.parametrize("part", ["state", "task"])
def test_batch_size_mismatch_names_the_sizes(setup, part):
    _, pre, _, ds = setup
    obs = _obs(_raw(ds, (0, 1, 2)))  # 3 samples
    if part == "state":
        obs["observation.state"] = obs["observation.state"][:2]
        match = r"different batch sizes.*observation.images.top: 3.*observation.state: 2"
    else:
        obs["task"] = obs["task"][:2]
        match = r"different batch sizes.*observation.state: 3, task \(strings\): 2"
    with pytest.raises(ValueError, match=match):
        pre(obs)


def test_prompt_too_long_names_the_fix_for_a_saved_checkpoint(setup, tmp_path):
    """A saved preprocessor keeps its own max_length: the message names the step override that raises it,
    and that override works."""
    from lerobot.policies.factory import make_pre_post_processors

    policy, pre, post, ds = setup
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    obs = _obs(_raw(ds))
    obs["task"] = ["a very long instruction " * 10] * 2
    loaded, _ = make_pre_post_processors(policy.config, pretrained_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs (\d+) tokens") as err:
        loaded(obs)
    need = int(err.value.args[0].split("needs ")[1].split(" ")[0])
    assert f"--policy.tokenizer_max_length={need}" in str(err.value)
    assert f"{{'ki_vla_text_tokenizer': {{'max_length': {need}}}}}" in str(err.value)
    raised, _ = make_pre_post_processors(
        policy.config,
        pretrained_path=str(tmp_path),
        preprocessor_overrides={"ki_vla_text_tokenizer": {"max_length": need}},
    )
    assert raised(obs)["observation.language.tokens"].shape == (2, need)


def test_fast_step_without_tokenizer_passes_single_step_actions(setup):
    """A pipeline built from config + stats alone (no dataset to fit FAST on) handles env/inference
    batches whose action is one step (B, A); a chunk still needs the tokenizer."""
    policy, _, _, ds = setup
    pre, _ = make_ki_vla_pre_post_processors(policy.config, ds.meta.stats)  # no _runtime_dataset_meta
    raw = _raw(ds)
    batch = pre({**raw, "action": raw["action"][:, 0]})
    assert batch["action"].shape == (2, 3) and "action.tokens" not in batch
    with pytest.raises(RuntimeError, match="no FAST tokenizer"):
        pre(raw)


# --- caught when the policy is configured, before the FAST fit and the model build ----------------------


def test_dataset_without_camera_is_refused_by_make_policy(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_policy
    from synthetic_dataset import make_random_walk_dataset

    make_random_walk_dataset(tmp_path / "ds", "local/no_cam", cameras=0, episodes=1, length=12)
    meta = LeRobotDataset("local/no_cam", root=tmp_path / "ds").meta
    cfg = tiny_config(max_state_dim=8, max_action_dim=8, empty_cameras=1)
    cfg.input_features, cfg.output_features = {}, {}  # make_policy takes them from the dataset
    with pytest.raises(ValueError, match=r"needs at least one real camera.*empty_cameras only adds blank"):
        make_policy(cfg, ds_meta=meta)


def test_nan_action_names_feature_dimension_frame_and_episode(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from synthetic_dataset import make_random_walk_dataset

    make_random_walk_dataset(tmp_path / "ds", "local/nan_action", episodes=3, length=20, nan_at=(25, 4))
    meta = LeRobotDataset("local/nan_action", root=tmp_path / "ds").meta
    cfg = tiny_config(chunk_size=10, max_state_dim=8, max_action_dim=8, fast_vocab_size=1024)
    cfg.input_features = {"observation.images.cam0": PolicyFeature(FeatureType.VISUAL, (3, 32, 32))}
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (7,))
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (7,))}
    cfg._runtime_dataset_meta = meta
    with pytest.raises(
        ValueError,
        match=r"NaN/Inf in 'action' at 1 value\(s\): dimension\(s\) \[4\], frame index\(es\) \[25\] "
        r"in episode\(s\) \[1\].*clean the dataset.*--operation.episode_indices=\"\[1\]\"",
    ):
        make_ki_vla_pre_post_processors(cfg, meta.stats)


# --- loading a checkpoint -------------------------------------------------------------------------------


def test_missing_checkpoint_directory_is_named(tmp_path):
    gone = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    with pytest.raises(FileNotFoundError, match=rf"No checkpoint directory at {gone}: it does not exist"):
        KIPolicy.from_pretrained(gone)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KIPolicy.from_pretrained(str(gone))


def test_truncated_weights_file_is_named(setup, tmp_path):
    policy, _, _, _ = setup
    policy.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=rf"{weights} cannot be read.*truncated or corrupt"):
        KIPolicy.from_pretrained(tmp_path)


def test_config_that_disagrees_with_the_weights_names_the_field(setup, tmp_path):
    import json

    policy, _, _, _ = setup
    policy.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["max_action_dim"] = 12  # trained with 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match its weights.*action_.*_proj.*max_action_dim=12"):
        KIPolicy.from_pretrained(tmp_path)
