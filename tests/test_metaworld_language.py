"""The language-following Meta-World variant: reach / push / pick-place look the same at a seed, their goals
are fixed, the puck still moves with the seed, the scripted experts still succeed, and `tasks_satisfied`
agrees with Meta-World's own success signal.

Needs the simulator (metaworld, mujoco) and offscreen EGL rendering, which `scripts/setup_env.sh` installs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np
import pytest

from lerobot_ki.metaworld_language import (
    LANGUAGE_GOALS,
    LANGUAGE_TASKS,
    PUCK_HIGH,
    PUCK_LOW,
    PUCK_REST_Z,
    SUCCESS_RADIUS,
    final_state,
    make_language_following,
    tasks_satisfied,
)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)


def _reset_frame(env, seed: int) -> np.ndarray:
    """The first frame of LeRobot's `reset(seed)`. gymnasium's offscreen viewer renders into whichever
    EGL context is current and never makes its own current: with several envs in one process (and after
    one is closed, whose context is then gone: black frames) each must be made current before it renders."""
    env._ensure_env()
    env._env.mujoco_renderer._get_viewer("rgb_array").make_context_current()
    frame = env.reset(seed=seed)[0]["pixels"]
    assert frame.std() > 10  # a rendered scene, not a blank buffer
    return frame


@pytest.fixture(scope="module")
def envs():
    """LeRobot's Meta-World env of each task (as lerobot-eval builds it), modified."""
    from lerobot.envs.metaworld import MetaworldEnv

    built = {task: MetaworldEnv(task=task, obs_type="pixels_agent_pos") for task in LANGUAGE_TASKS}
    for env in built.values():
        make_language_following(env)
    yield built
    for env in built.values():
        env.close()


def test_first_frames_are_identical_across_tasks(envs):
    for seed in SEEDS:
        frames = {task: _reset_frame(env, seed) for task, env in envs.items()}
        assert frames["reach-v3"].shape == (480, 480, 3)
        for task in LANGUAGE_TASKS[1:]:
            assert np.array_equal(frames["reach-v3"], frames[task]), (seed, task)
    # ...and the goal marker is in view, so hiding it is what makes them equal
    for env in envs.values():
        hidden = _reset_frame(env, SEEDS[0])
        site = env._env.model.site("goal").id
        env._env.model.site_rgba[site, 3] = 1.0
        try:
            assert not np.array_equal(env.render(), hidden)
        finally:
            env._env.model.site_rgba[site, 3] = 0.0


def test_goal_is_fixed_and_the_puck_moves_with_the_seed_not_the_task(envs):
    pucks = {}
    for task, env in envs.items():
        sim = env._env
        for seed in range(4):
            sim.seed(seed)
            raw, _ = sim.reset(seed=seed)  # Meta-World's reset, as LeRobot's calls it, without a render
            goal = np.asarray(LANGUAGE_GOALS[task])
            np.testing.assert_allclose(sim._target_pos, goal, atol=1e-5)  # push: z = the rested puck
            np.testing.assert_allclose(sim.model.site("goal").pos, sim._target_pos)
            np.testing.assert_allclose(raw[36:39], sim._target_pos)  # what the expert reads
            assert sim.model.site_rgba[sim.model.site("goal").id, 3] == 0.0
            puck = np.array(sim._get_pos_objects())  # a copy: MuJoCo returns a view
            assert np.all(puck[:2] >= PUCK_LOW) and np.all(puck[:2] <= PUCK_HIGH)
            assert puck[2] == pytest.approx(PUCK_REST_Z, abs=1e-5)
            pucks[task, seed] = puck
    for seed in range(4):
        for task in LANGUAGE_TASKS[1:]:
            assert np.array_equal(pucks["reach-v3", seed], pucks[task, seed])
    assert len({tuple(pucks["reach-v3", s]) for s in range(4)}) == 4


def test_make_language_following_twice_changes_nothing(envs):
    sim = envs["push-v3"]._env
    patched = sim._get_state_rand_vec
    assert make_language_following(envs["push-v3"]) is sim and sim._get_state_rand_vec is patched


@pytest.mark.parametrize("task", LANGUAGE_TASKS)
def test_scripted_expert_succeeds_and_only_its_task_is_satisfied(envs, task):
    from lerobot.envs.metaworld import TASK_POLICY_MAPPING

    sim, expert = envs[task]._env, TASK_POLICY_MAPPING[task]()
    sim.seed(0)
    raw, _ = sim.reset(seed=0)
    success = False
    for _ in range(200):  # the experts need ~50-70 steps here
        raw, _, _, _, info = sim.step(np.clip(expert.get_action(raw), -1, 1).astype(np.float32))
        if info["success"]:
            success = True
            break
    assert success
    hand, puck = final_state(sim)
    assert tasks_satisfied(hand, puck) == {t: t == task for t in LANGUAGE_TASKS}


@pytest.mark.parametrize("task", ["push-v3", "pick-place-v3"])
def test_radii_agree_with_the_envs_success_signal(envs, task):
    """A puck put just inside / outside the radius of its goal: Meta-World's `evaluate_state` and
    `tasks_satisfied` say the same."""
    sim = envs[task]._env
    sim.seed(0)
    sim.reset(seed=0)
    goal = np.asarray(LANGUAGE_GOALS[task])
    for factor in (0.9, 1.1):
        puck = goal + np.array([SUCCESS_RADIUS[task] * factor, 0.0, 0.0])
        sim._set_obj_xyz(puck)
        _, info = sim.evaluate_state(sim._get_obs(), np.zeros(4, dtype=np.float32))
        hand, now = final_state(sim)
        assert bool(info["success"]) == tasks_satisfied(hand, now)[task] == (factor < 1)


def test_tasks_satisfied_on_constructed_states():
    reach, push, place = (np.asarray(LANGUAGE_GOALS[t]) for t in LANGUAGE_TASKS)
    start = np.array([0.0, 0.65, PUCK_REST_Z])
    above = np.array([0.0, 0.6, 0.2])
    none = dict.fromkeys(LANGUAGE_TASKS, False)
    assert tasks_satisfied(above, start) == none
    assert tasks_satisfied(reach + [0.0, 0.0, 0.04], start) == {**none, "reach-v3": True}
    # pushed to push's goal, hand still behind the puck
    assert tasks_satisfied(push - [0.0, 0.03, 0.0], push + [0.0, 0.03, 0.0]) == {**none, "push-v3": True}
    # carried to pick-place's goal: the same xy as push's, but lifted, so push does not count
    assert tasks_satisfied(place, place - [0.0, 0.0, 0.06]) == {**none, "pick-place-v3": True}
    # pushed, then the hand went to reach's goal: both count
    assert tasks_satisfied(reach, push) == {**none, "reach-v3": True, "push-v3": True}
    # the puck under pick-place's goal on the table is a push, not a pick-place
    assert tasks_satisfied(above, place * [1, 1, 0] + [0, 0, PUCK_REST_Z])["pick-place-v3"] is False


def test_goals_are_far_apart_and_never_move_the_puck():
    goals = [np.asarray(LANGUAGE_GOALS[t]) for t in LANGUAGE_TASKS]
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(goals) for b in goals[i + 1 :]]
    assert min(gaps) > 2 * max(SUCCESS_RADIUS.values())
    # Meta-World re-draws the start when the puck is within 0.15 m (xy) of the goal; no puck start is
    assert all(g[1] - PUCK_HIGH[1] >= 0.15 - 1e-12 for g in goals)


def test_record_dataset_hide_goals(tmp_path, envs):
    spec = importlib.util.spec_from_file_location(
        "record_dataset", ROOT / "examples/metaworld/record_dataset.py"
    )
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    # Other tasks in the same recording stay the standard env.
    _, vec_env, other = recorder._make_lerobot_env(recorder._import_backend(), "drawer-open-v3", None, True)
    assert not hasattr(other._env, "_language_following")
    vec_env.close()
    summary = recorder.record(
        ["push-v3"], 1, tmp_path / "ds", repo_id="local/mw_lang", max_steps=2, keep_failed=True,
        use_videos=False, show_progress=False, hide_goals=True,
    )  # fmt: skip
    assert summary["hide_goals"] == ["push-v3"] and summary["total_frames"] == 2
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    frame = LeRobotDataset("local/mw_lang", root=tmp_path / "ds")[0]
    expected = _reset_frame(envs["reach-v3"], 0)  # the same first frame as any of the three
    stored = (frame["observation.image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(stored, expected)
