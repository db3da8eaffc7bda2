"""The main job's path at toy size: record Meta-World demos -> lerobot-train ki_vla -> LeRobot's eval loop.

Needs the simulator (metaworld, mujoco) and offscreen EGL rendering, which `scripts/setup_env.sh` installs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASK = "button-press-topdown-v3"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ.setdefault("MUJOCO_GL", "egl")
    tmp = tmp_path_factory.mktemp("mw_main")
    recorder = _load("record_dataset", ROOT / "examples" / "metaworld" / "record_dataset.py")
    summary = recorder.record(
        [TASK], 1, tmp / "ds", repo_id="local/mw_toy", max_steps=12, keep_failed=True,
        use_videos=False, show_progress=False,
    )  # fmt: skip
    assert summary["total_frames"] == 12
    main_job = _load("main_job", ROOT / "examples" / "metaworld" / "main_job.py")
    cmd = [
        str(Path(sys.executable).parent / "lerobot-train"), "--policy.type=ki_vla",
        "--policy.paligemma_variant=tiny", "--policy.action_expert_variant=tiny",
        "--policy.image_resolution=[32,32]", "--policy.tokenizer_max_length=96",
        f"--policy.normalization_mapping={main_job.NORMALIZATION}", "--policy.chunk_size=6",
        "--policy.n_action_steps=3", "--policy.max_state_dim=8", "--policy.max_action_dim=8",
        "--policy.fast_vocab_size=512", "--policy.device=cpu", "--policy.push_to_hub=false",
        "--dataset.repo_id=local/mw_toy", f"--dataset.root={tmp / 'ds'}", "--batch_size=2", "--steps=3",
        "--log_freq=1", "--save_freq=3", "--num_workers=0", f"--output_dir={tmp / 'train'}",
        "--wandb.enable=false",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, main_job.parse_train_log(proc.stdout + proc.stderr, log_freq=1)


def test_recorded_dataset_matches_the_eval_env(trained):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    tmp, _ = trained
    ds = LeRobotDataset("local/mw_toy", root=tmp / "ds")
    frame = ds[0]
    assert frame["observation.image"].shape == (3, 480, 480)
    assert frame["observation.state"].shape == (4,) and frame["action"].shape == (4,)
    assert frame["task"] == "Press a button from the top"  # the string LeRobot's Meta-World env sends


def test_training_logged_both_losses(trained):
    _, rows = trained
    assert len(rows) == 3
    assert all(np.isfinite(r["loss_fast_ce"]) and r["loss_fast_ce"] > 0 for r in rows)
    assert all(np.isfinite(r["loss_flow"]) and r["loss_flow"] > 0 for r in rows)


def test_lerobot_eval_loop_runs_the_checkpoint_in_the_simulator(trained):
    """LeRobot's own `eval_policy` (what lerobot-eval calls), with the episode cut to a few steps."""
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy

    from lerobot_ki.modeling_ki import KIPolicy

    tmp, _ = trained
    ckpt = tmp / "train" / "checkpoints" / "last" / "pretrained_model"
    policy = KIPolicy.from_pretrained(ckpt)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
    env_cfg = MetaworldEnv(task=TASK)
    envs = make_env(env_cfg, n_envs=1)
    vec_env = next(iter(next(iter(envs.values())).values()))
    vec_env.set_attr("_max_episode_steps", 7)
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    calls = []
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda batch, **kw: calls.append(1) or original(batch, **kw)
    with torch.no_grad():
        info = eval_policy(vec_env, policy, env_pre, env_post, pre, post, n_episodes=1, start_seed=1000)
    vec_env.close()
    episode = info["per_episode"][0]
    assert np.isfinite(episode["sum_reward"])
    assert len(calls) == 3  # 7 steps with 3 actions per chunk: chunks at steps 0, 3, 6
    json.dumps(info["aggregated"])  # the eval summary lerobot-eval writes is serialisable
