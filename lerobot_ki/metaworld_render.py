"""Cheap rendering for LeRobot's Meta-World env: the same task, physics and success signal, drawn small.

LeRobot's `MetaworldEnv` renders 480x480 frames with MuJoCo's default visual quality. On our 2-core CPUs
(software EGL) nearly all of that cost is the 4096x4096 shadow map redrawn every frame, not the frame
size: measured 2026-11-27, one reach-v3 step took 270-760 ms with shadows and 27 ms at 96 px with shadows
and multisampling off, while physics alone took 1-2 ms. An experiment that evaluates many policies for
hundreds of episodes cannot pay the former, so `cheap_rendering` renders at the policy's resolution with
no cast shadows and no multisample anti-aliasing. Only the pixels change: the MuJoCo model's geometry,
the env's seeding, reward, termination and `is_success` are LeRobot's own. Demonstrations recorded and
policies evaluated must use the same rendering (images differ from the standard 480 px ones).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any


def cheap_rendering(env: Any, size: int, max_steps: int | None = None) -> Any:
    """Makes a `lerobot.envs.metaworld.MetaworldEnv` render `size` x `size` frames without shadows or
    multisampling (and, with `max_steps`, end episodes sooner than Meta-World's 500 steps: for quick
    checks, not for reported success). Returns the same env. Its observation space must already be
    `size` (build it with observation_width/height = size, as `make_cheap_metaworld_envs` does)."""
    space = env.observation_space["pixels"].shape
    if space[:2] != (size, size):
        raise ValueError(f"env observation space is {space}, not {size}x{size}: build it at that size")
    env._ensure_env()  # LeRobot defers building the MuJoCo env until first use
    inner = env._env
    inner.model.light_castshadow[:] = 0
    inner.model.vis.quality.offsamples = 0
    # The renderer is created lazily at the first render with these sizes.
    inner.mujoco_renderer.width = inner.mujoco_renderer.height = size
    inner.width = inner.height = size
    if max_steps is not None:
        # LeRobot's rollout loop reads this attribute as its step cap.
        env._max_episode_steps = min(max_steps, env._max_episode_steps)
    return env


class FramesOnQuery:
    """Makes a LeRobot Meta-World env draw its observation frame only every `every`-th observation since
    reset (0, every, 2 * every, ...) and repeat the last frame in between; physics, state, reward and
    success are untouched. For a policy that reads observations only when its queue of `every` actions
    runs empty (n_obs_steps 1, n_action_steps `every`, as LeRobot's ACT and ki_vla do) it sees exactly
    the frames it would have seen, and evaluation renders `every` times fewer frames. Videos are not
    affected: `env.render()` still draws."""

    def __init__(self, env: Any, every: int) -> None:
        self.env, self.every, self.count, self.frame = env, every, 0, None
        self.format_raw_obs, self.reset = env._format_raw_obs, env.reset
        env._format_raw_obs = self._format  # instance attributes: the class's methods are unchanged
        env.reset = self._reset

    def _reset(self, *args: Any, **kwargs: Any):
        self.count = 0
        return self.reset(*args, **kwargs)

    def _format(self, raw_obs: Any):
        inner = self.env._env
        if self.count % self.every == 0:  # count 0 is the reset's observation: always drawn
            self.frame = inner.render()
        self.count += 1
        # LeRobot's formatting reads the frame through the inner env's render(): hand it this one, then
        # put back what was there (the class's method, or an instance attribute someone else set).
        previous = inner.__dict__.get("render")
        inner.render = lambda: self.frame
        try:
            return self.format_raw_obs(raw_obs)
        finally:
            if previous is None:
                del inner.render
            else:
                inner.render = previous


def _cheap_env(factory, size: int, max_steps: int | None, adjust: Callable[[Any], Any] | None,
               render_every: int = 1):  # fmt: skip
    env = cheap_rendering(factory(), size, max_steps)
    if render_every > 1:
        FramesOnQuery(env, render_every)
    if adjust is not None:
        adjust(env)
    return env


def make_cheap_metaworld_envs(
    task: str,
    n_envs: int,
    size: int,
    max_steps: int | None = None,
    adjust: Callable[[Any], Any] | None = None,
    render_every: int = 1,
) -> dict[str, dict[int, Any]]:
    """LeRobot's `create_metaworld_envs` (same nested {group: {task_id: vec_env}} as `make_env`, so it
    feeds `lerobot_eval.eval_policy_all`), with every env rendered by `cheap_rendering` (observation
    frames only every `render_every` steps: `FramesOnQuery`) and then passed to `adjust` (e.g. the
    language-following variant), if given."""
    import gymnasium as gym
    from lerobot.envs.metaworld import create_metaworld_envs

    gym_kwargs = {
        "obs_type": "pixels_agent_pos",
        "render_mode": "rgb_array",
        "observation_width": size,
        "observation_height": size,
    }

    def sync_vector_env(factories):
        return gym.vector.SyncVectorEnv(
            [partial(_cheap_env, f, size, max_steps, adjust, render_every) for f in factories]
        )

    return create_metaworld_envs(task=task, n_envs=n_envs, gym_kwargs=gym_kwargs, env_cls=sync_vector_env)
