"""A Meta-World setting in which only the instruction tells the tasks apart.

reach-v3, push-v3 and pick-place-v3 share the table, the arm and the puck (their MJCF files differ only
in the goal site: its colour and default position). In the standard env a policy can tell the task from
the goal marker's colour and read the goal from where the marker is. `make_language_following(env)`
adjusts the env object LeRobot builds (nothing of LeRobot or Meta-World is copied or changed on disk) so
that, at the same seed, the three tasks render the same first frame:

- the goal site is made fully transparent (the only visual marker that differs; the other sites are the
  arm's and are the same in the three files);
- the goal is a fixed point per task (`LANGUAGE_GOALS`), so with the marker hidden the task stays solvable
  from pixels + state once the instruction names the task;
- the puck start is drawn by one rule from the env's seeded generator for all three tasks, so it still
  varies with the seed but not with the task. The hand start is Meta-World's fixed `hand_init_pos`
  (0, 0.6, 0.2) in all three tasks, as in the standard env.

Success is still Meta-World's own `info["success"]` of the instructed task. `tasks_satisfied` says, from
a final state, which of the three tasks' success conditions hold, to count "did the other task instead".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

LANGUAGE_TASKS = ("reach-v3", "push-v3", "pick-place-v3")

# Meta-World's puck start range, the same (-0.1..0.1, 0.6..0.7) in the three classes' `obj_low/obj_high`.
PUCK_LOW = np.array([-0.1, 0.6])
PUCK_HIGH = np.array([0.1, 0.7])

# The puck's height once it rests on the table: push-v3 starts the puck (and puts its goal) at this height
# (`fix_extreme_obj_pos` reads the body's z after the hand reset has settled it), reach/pick-place at the
# 0.02 of their random vector. We use the rested height for all three so their first frames agree; the
# value is what the simulator gives (checked by the tests).
PUCK_REST_Z = 0.019417

# Goals: each class's default `self.goal` (where its MJCF puts the goal site) with y moved from 0.8 to
# 0.85, the centre of the goal ranges' y (0.8..0.9). At y >= 0.85 no puck start (y <= 0.7) is within the
# 0.15 m at which Meta-World re-draws the random vector, so the puck never depends on the task's goal.
# Pairwise the goals are >= 0.18 m apart, more than any success radius (0.05 / 0.05 / 0.07) plus the hand-
# to-puck offset, so doing one task cannot count as doing another by accident.
LANGUAGE_GOALS: dict[str, tuple[float, float, float]] = {
    "reach-v3": (-0.1, 0.85, 0.2),  # the hand goes here
    "push-v3": (0.1, 0.85, PUCK_REST_Z),  # the puck slides here (push's goal z is the puck's height)
    "pick-place-v3": (0.1, 0.85, 0.2),  # the puck is carried up to here
}

# Success radii of Meta-World v3's `evaluate_state` (metaworld 3.0.0): reach `reach_dist <= 0.05` (hand to
# goal), push `target_to_obj <= TARGET_RADIUS` (0.05, puck to goal), pick-place `obj_to_target <= 0.07`
# (puck to goal). All are 3-D distances. Reach and pick-place write theirs as literals, so they are
# restated here; the tests check push's and pick-place's against the envs' success signal just inside and
# outside the radius, reach's only at the end of an expert episode.
SUCCESS_RADIUS = {"reach-v3": 0.05, "push-v3": 0.05, "pick-place-v3": 0.07}
_HAND_TASKS = frozenset({"reach-v3"})  # the others measure the puck

_GOAL_SITE = "goal"


def _inner_env(env: Any) -> Any:
    """The Meta-World env inside LeRobot's `MetaworldEnv` (created on first use), or `env` itself."""
    if hasattr(env, "_ensure_env"):
        env._ensure_env()
        return env._env
    return env


_TASK_OF_CLASS = {
    "SawyerReachEnvV3": "reach-v3",
    "SawyerPushEnvV3": "push-v3",
    "SawyerPickPlaceEnvV3": "pick-place-v3",
}


def make_language_following(env: Any) -> Any:
    """Hide the goal marker, fix the goal and share the puck start rule, for every later `reset(seed=...)`.

    `env` is LeRobot's `lerobot.envs.metaworld.MetaworldEnv` (its inner env is built here if it is not yet)
    or the inner Meta-World env; it must be in this process (with an `AsyncVectorEnv` the envs live in the
    workers). Returns the inner Meta-World env. Applying it twice is harmless.
    """
    sim = _inner_env(env)
    task = _TASK_OF_CLASS.get(type(sim).__name__)
    if task is None:
        raise ValueError(f"{type(sim).__name__} is not the env of one of {LANGUAGE_TASKS}")
    if getattr(sim, "_language_following", None) == task:
        return sim
    if not getattr(sim, "seeded_rand_vec", False) or sim._freeze_rand_vec:
        raise ValueError("expected LeRobot's set-up: seeded_rand_vec=True and _freeze_rand_vec=False")

    import mujoco

    site = mujoco.mj_name2id(sim.model, mujoco.mjtObj.mjOBJ_SITE, _GOAL_SITE)
    sim.model.site_rgba[site, 3] = 0.0  # alpha 0: MuJoCo draws nothing for it; it still marks the goal
    goal = np.asarray(LANGUAGE_GOALS[task], dtype=np.float64)

    def language_rand_vec() -> np.ndarray:
        # Replaces Meta-World's draw of [puck xyz, goal xyz] (reset_model calls it after the hand reset).
        # The puck xy comes from the env's own seeded generator, so `reset(seed)` still fixes it, but by a
        # rule the three tasks share (Meta-World's would as well, until its goal-distance re-draw).
        xy = sim.np_random.uniform(PUCK_LOW, PUCK_HIGH)
        # The rested height push uses, read from the simulator as push's `fix_extreme_obj_pos` does.
        z = float(sim.get_body_com("obj")[2])
        vec = np.concatenate([xy, [z], goal])
        sim._last_rand_vec = vec
        return vec

    sim._get_state_rand_vec = language_rand_vec  # an instance attribute: found before the class method
    sim._language_following = task
    return sim


def tasks_satisfied(
    hand: Any,
    puck: Any,
    goals: Mapping[str, Any] = LANGUAGE_GOALS,
    radius: Mapping[str, float] = SUCCESS_RADIUS,
) -> dict[str, bool]:
    """Which of the three tasks' success conditions hold in a state: reach = hand (the env's `tcp_center`)
    within its radius of reach's goal; push / pick-place = puck within theirs of their goals (3-D, so a
    puck lifted off the table is not at push's goal, nor a puck on the table at pick-place's)."""
    hand_xyz = np.asarray(hand, dtype=np.float64)
    puck_xyz = np.asarray(puck, dtype=np.float64)
    out = {}
    for task in LANGUAGE_TASKS:
        point = hand_xyz if task in _HAND_TASKS else puck_xyz
        out[task] = bool(np.linalg.norm(point - np.asarray(goals[task], dtype=np.float64)) <= radius[task])
    return out


def final_state(env: Any) -> tuple[np.ndarray, np.ndarray]:
    """(hand, puck) positions of the env now, the inputs of `tasks_satisfied`. LeRobot's `MetaworldEnv.step`
    resets the env itself on the step where the instructed task succeeds (that success is in
    `info["is_success"]`), so use it after an episode that ran out of steps, or on the inner Meta-World env
    stepped directly, which does not reset itself."""
    sim = _inner_env(env)
    return np.array(sim.tcp_center, dtype=np.float64), np.array(sim._get_pos_objects()[:3], dtype=np.float64)
