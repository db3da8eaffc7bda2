"""Rendered Meta-World scenes with the simulator's facts about them, for the VLM corpus.

Scenes come from LeRobot's own Meta-World env (`lerobot.envs.metaworld.MetaworldEnv`: the MT1 task, the
`corner2` camera moved and flipped as `lerobot-eval --env.type=metaworld` has it, `reset(seed)` fixing
the object placement). The scripted expert (with a little action noise, so that frames of one task do not
all lie on one path) drives the arm; at a few random steps of each episode the frame is rendered at 480 px
exactly as the env renders it and resized to the policy's resolution with the function the policy itself
uses (`resize_with_pad_torch`), so the VLM sees what the policy will see. Positions are projected into
the image through the camera's pose and field of view.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np
import torch
from lerobot.policies.common.vla_utils import resize_with_pad_torch

from lerobot_ki.scene_questions import SceneFacts

CAMERA = "corner2"  # LeRobot's Meta-World camera


@dataclass(frozen=True)
class Scene:
    task: str
    seed: int
    step: int
    image: np.ndarray  # (R, R, 3) uint8, what the policy sees
    facts: SceneFacts


def project(model, data, camera: str, point: np.ndarray, flipped: bool) -> tuple[float, float]:
    """World point -> (x, y) as fractions of the rendered image (x right, y down). MuJoCo cameras look
    along their -z axis with y up; LeRobot flips corner2 images on both axes."""
    import mujoco

    cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    rot = data.cam_xmat[cid].reshape(3, 3)
    v = rot.T @ (np.asarray(point, dtype=np.float64) - data.cam_xpos[cid])  # camera frame
    half = np.tan(np.deg2rad(model.cam_fovy[cid]) / 2)  # square image: same for both axes
    x = 0.5 + 0.5 * (v[0] / -v[2]) / half
    y = 0.5 - 0.5 * (v[1] / -v[2]) / half
    return (1.0 - x, 1.0 - y) if flipped else (x, y)


def to_policy_image(frame: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W, 3) uint8 render -> (R, R, 3) uint8, resized as the ki_vla policy resizes camera frames."""
    img = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    if tuple(img.shape[-2:]) != (resolution, resolution):
        img = resize_with_pad_torch(img, resolution, resolution)
    return (img[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def episode_scenes(
    env,
    expert,
    task: str,
    seed: int,
    frames: int,
    max_step: int,
    resolution: int,
    action_noise: float,
) -> Iterator[Scene]:
    """`frames` scenes at distinct random steps in [0, max_step) of one expert episode. The expert's actions
    get Gaussian noise of a per-episode scale in [0, action_noise], so some episodes wander off the
    expert's path (the gripper is seen in more places). Everything random is drawn from (task, seed), so
    the same arguments give the same scenes."""
    rng = np.random.default_rng([zlib.crc32(task.encode()), seed, frames, max_step])
    noise = rng.uniform(0.0, action_noise)
    steps = sorted(rng.choice(max_step, size=min(frames, max_step), replace=False).tolist())
    # LeRobot's reset, without the frame it renders (a third of a second we would throw away): Meta-World's
    # own env is seeded, reset and stepped directly, so unrendered steps cost no rendering.
    env._ensure_env()
    sim = env._env
    sim.seed(seed)
    raw, _ = sim.reset(seed=seed)
    step = 0
    for target in steps:
        while step < target:
            action = np.clip(expert.get_action(raw) + rng.normal(0.0, noise, 4), -1.0, 1.0)
            raw, *_ = sim.step(action.astype(np.float32))
            step += 1
        hand, obj = np.asarray(sim.tcp_center), np.asarray(sim._get_pos_objects()[:3])
        flipped = env.camera_name == CAMERA
        facts = SceneFacts(
            task=task,
            hand_xyz=tuple(float(v) for v in hand),
            object_xyz=tuple(float(v) for v in obj),
            hand_xy_image=project(sim.model, sim.data, env.camera_name, hand, flipped),
            object_xy_image=project(sim.model, sim.data, env.camera_name, obj, flipped),
            gripper_opening=float(raw[3]),
        )
        yield Scene(task, seed, step, to_policy_image(env.render(), resolution), facts)


def task_scenes(
    task: str,
    seeds: list[int],
    frames: int,
    max_step: int,
    resolution: int,
    action_noise: float = 0.6,
) -> Iterator[Scene]:
    """Scenes of one task over several episode seeds, through LeRobot's Meta-World env."""
    from lerobot.envs.metaworld import TASK_POLICY_MAPPING, MetaworldEnv

    env = MetaworldEnv(task=task, camera_name=CAMERA, obs_type="pixels_agent_pos")
    expert = TASK_POLICY_MAPPING[task]()
    try:
        for seed in seeds:
            yield from episode_scenes(env, expert, task, seed, frames, max_step, resolution, action_noise)
    finally:
        env.close()
