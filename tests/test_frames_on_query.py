"""Evaluation draws only the observation frames the policy reads (`FramesOnQuery`, `frames_read_every`):
the same frames at the policy's query steps, the same physics and reward at every step, fewer renders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "metaworld"))

from evaluate import frames_read_every  # noqa: E402

TASK = "window-open-v3"
SIZE, EVERY = 32, 5


def _env(every: int):
    from lerobot.envs.metaworld import MetaworldEnv

    from lerobot_ki.metaworld_render import FramesOnQuery, cheap_rendering

    env = cheap_rendering(
        MetaworldEnv(task=TASK, obs_type="pixels_agent_pos", observation_width=SIZE, observation_height=SIZE),
        SIZE,
    )
    if every > 1:
        FramesOnQuery(env, every)
    renders = []
    inner_render = env._env.render

    def counted():
        renders.append(1)
        return inner_render()

    env._env.render = counted
    return env, renders


def _episode(env, steps: int, seed: int):
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=seed)
    out = [(obs["pixels"].copy(), obs["agent_pos"].copy(), 0.0)]
    for _ in range(steps):
        obs, reward, *_ = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        out.append((obs["pixels"].copy(), obs["agent_pos"].copy(), reward))
    return out


def test_frames_on_query_draws_only_the_frames_the_policy_reads():
    full, full_renders = _env(1)
    lazy, lazy_renders = _env(EVERY)
    for seed in (1000, 1001):  # a second reset starts the count again
        a, b = _episode(full, 12, seed), _episode(lazy, 12, seed)
        for i, ((_, sa, ra), (pb, sb, rb)) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_array_equal(sa, sb)  # physics and state: every step
            assert ra == rb
            # The frame at a query step is the real one; in between, the last query's frame.
            np.testing.assert_array_equal(pb, a[i - i % EVERY][0])
        # The arm moves: the repeated frames are stale, not the real ones (the check above can fail).
        assert any(not np.array_equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert len(full_renders) == 2 * 13 and len(lazy_renders) == 2 * 3  # observations 0, 5, 10 per episode
    # A video frame (env.render()) is still drawn at the current step.
    np.testing.assert_array_equal(lazy.render(), full.render())


def test_frames_read_every_follows_the_policy_config():
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    from lerobot_ki.configuration_ki import KIConfig

    assert frames_read_every(KIConfig(chunk_size=20, n_action_steps=5)) == 5
    assert frames_read_every(ACTConfig(chunk_size=20, n_action_steps=5)) == 5
    # Temporal ensembling predicts at every step; Diffusion Policy keeps two observations.
    assert frames_read_every(ACTConfig(n_action_steps=1, temporal_ensemble_coeff=0.01)) == 1
    assert frames_read_every(DiffusionConfig()) == 1
