"""The FAST budget (`max_fast_tokens`) is settled when training starts, from the fitted tokenizer's token
counts on the training data: sized when left unset, refused (with the value to pass) when set too small,
never an error at some later step. Data: chunks of 50 steps of a 7-dim arm, FAST fitted as usual."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_POLICY_ARGS, logged_steps, run_logged, venv_script
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.feature_utils import dataset_to_policy_features
from synthetic_dataset import make_random_walk_dataset

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.fast_artifacts import fast_budget_for, fit_fast_on_dataset
from lerobot_ki.processor_ki import make_ki_vla_pre_post_processors

REPO_ID = "local/ki_arm7"
CHUNK = 50


@pytest.fixture(scope="module")
def arm7(tmp_path_factory):
    root = tmp_path_factory.mktemp("arm7") / "ds"
    make_random_walk_dataset(root, REPO_ID, action_dim=7)
    meta = LeRobotDataset(REPO_ID, root=root).meta
    return root, meta


def _config(meta, **overrides) -> KIConfig:
    cfg = KIConfig(
        paligemma_variant="tiny",
        action_expert_variant="tiny",
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        max_state_dim=8,
        max_action_dim=8,
        device="cpu",
        **overrides,
    )
    features = dataset_to_policy_features(meta.features)
    cfg.output_features = {"action": features.pop("action")}
    cfg.input_features = features
    cfg._runtime_dataset_meta = meta  # what LeRobot's make_policy sets
    return cfg


def _longest_chunk(root, meta) -> int:
    _, stats = fit_fast_on_dataset(REPO_ID, root, _config(meta), meta.stats)
    return stats["max_tokens"]


def test_a_budget_set_too_small_stops_at_startup_with_the_value_to_pass(arm7):
    root, meta = arm7
    longest = _longest_chunk(root, meta)
    assert longest + 1 > 64  # the case of the issue: the old default did not fit
    with pytest.raises(ValueError, match=rf"needs up to {longest + 1} tokens.*max_fast_tokens=64") as err:
        make_ki_vla_pre_post_processors(_config(meta, max_fast_tokens=64), meta.stats)
    assert f"--policy.max_fast_tokens={fast_budget_for(longest)}" in str(err.value)
    # With truncation chosen, the same budget is accepted (chunks over it are cut and counted).
    cfg = _config(meta, max_fast_tokens=64, fast_overflow="truncate")
    make_ki_vla_pre_post_processors(cfg, meta.stats)
    assert cfg.max_fast_tokens == 64


def test_a_pretrained_fast_tokenizer_is_measured_on_the_training_data(arm7, tmp_path):
    """With --policy.fast_tokenizer_path nothing is fitted, yet the budget is sized from the same counts."""
    root, meta = arm7
    tok, stats = fit_fast_on_dataset(REPO_ID, root, _config(meta), meta.stats)
    tok.save_pretrained(tmp_path / "fast")
    cfg = _config(meta, fast_tokenizer_path=str(tmp_path / "fast"))
    pre, _ = make_ki_vla_pre_post_processors(cfg, meta.stats)
    assert cfg.max_fast_tokens == fast_budget_for(stats["max_tokens"])
    fast_step = next(s for s in pre.steps if type(s).__name__ == "KIFastTokenizerStep")
    assert fast_step.max_fast_tokens == cfg.max_fast_tokens


def test_lerobot_train_sizes_an_unset_budget_from_the_data(arm7, tmp_path, offline_env):
    """Two lerobot-train steps on 50-step chunks of 7 dims with max_fast_tokens left unset: it runs, and
    the policy's config.json and the preprocessor's FAST step record the same sized budget."""
    root, meta = arm7
    expected = fast_budget_for(_longest_chunk(root, meta))
    assert expected > 64 and expected % 8 == 0
    args = [a for a in TINY_POLICY_ARGS if "chunk_size" not in a and "n_action_steps" not in a]
    out = tmp_path / "run"
    cmd = [
        venv_script("lerobot-train"),
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={root}",
        *args,
        f"--policy.chunk_size={CHUNK}",
        f"--policy.n_action_steps={CHUNK}",
        "--policy.image_resolution=[32,32]",
        f"--output_dir={out}",
        "--num_workers=0",
        "--wandb.enable=false",
        "--batch_size=2",
        "--steps=2",
        "--log_freq=1",
        "--save_freq=2",
    ]
    log = run_logged(cmd, offline_env, tmp_path / "train.log")
    assert logged_steps(log) == [1, 2]
    ckpt = out / "checkpoints" / "000002" / "pretrained_model"
    assert json.loads((ckpt / "config.json").read_text())["max_fast_tokens"] == expected
    steps = json.loads((ckpt / "policy_preprocessor.json").read_text())["steps"]
    fast_step = next(s for s in steps if s["registry_name"] == "ki_vla_fast_tokenizer")
    assert fast_step["config"]["max_fast_tokens"] == expected
