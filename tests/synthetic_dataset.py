"""A small LeRobotDataset made in the tests: 2 cameras, state, action, several tasks.

The actions are a smooth function of the task and the state, and the images show a task-coloured square at
a state-dependent place, so a policy can learn the mapping and a test can check that it did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TASKS = ("push the red block left", "lift the green cube", "open the blue drawer")
STATE_DIM = 4
ACTION_DIM = 3
IMAGE_SIZE = 32
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 80, 220]], dtype=np.uint8)


SIGNS = np.array([[1, 1, 1], [1, -1, 1], [-1, 1, -1]], dtype=np.float32)  # per task: what the prompt adds


def image_feature() -> dict:
    """One camera of both datasets (a fresh dict each: the dataset owns its features)."""
    return {"dtype": "image", "shape": (IMAGE_SIZE, IMAGE_SIZE, 3), "names": ["height", "width", "channels"]}


def state_at(t: int, length: int, phase: np.ndarray) -> np.ndarray:
    """Each state dim sweeps a full period per episode, so every episode spans [-1, 1] and LeRobot's
    per-episode quantile stats agree with the global ones (they are averaged across episodes)."""
    return np.sin(2 * np.pi * t / length + phase).astype(np.float32)


def expert_action(task_index: int, next_state: np.ndarray) -> np.ndarray:
    """Smooth in time, task-specific (the sign pattern) and state-dependent."""
    return (0.8 * SIGNS[task_index] * np.sin(np.pi / 2 * next_state[:ACTION_DIM])).astype(np.float32)


def render(task_index: int, state: np.ndarray, shift: int) -> np.ndarray:
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 30, dtype=np.uint8)
    x = int((state[0] + 1) / 2 * (IMAGE_SIZE - 8))
    y = (shift + 4 * task_index) % (IMAGE_SIZE - 8)
    img[y : y + 8, x : x + 8] = COLOURS[task_index]
    return img


def make_dataset(
    root: Path,
    repo_id: str = "local/ki_synthetic",
    episodes: int = 6,
    length: int = 20,
    fps: int = 10,
    seed: int = 0,
):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.images.top": image_feature(),
        "observation.images.wrist": image_feature(),
        "observation.state": {
            "dtype": "float32",
            "shape": (STATE_DIM,),
            "names": [f"s{i}" for i in range(STATE_DIM)],
        },
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": [f"a{i}" for i in range(ACTION_DIM)]},
    }
    ds = LeRobotDataset.create(repo_id, fps=fps, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(seed)
    for ep in range(episodes):
        task_index = ep % len(TASKS)
        phase = rng.uniform(0, 2 * np.pi, STATE_DIM)
        for t in range(length):
            state = state_at(t, length, phase)
            action = expert_action(task_index, state_at(t + 1, length, phase))
            ds.add_frame(
                {
                    "observation.images.top": render(task_index, state, t),
                    "observation.images.wrist": render(task_index, state[::-1].copy(), 0),
                    "observation.state": state.copy(),
                    "action": action,
                    "task": TASKS[task_index],
                }
            )
        ds.save_episode()
    ds.finalize()
    return ds


def make_random_walk_dataset(
    root: Path,
    repo_id: str = "local/ki_random_walk",
    action_dim: int = 7,
    cameras: int = 1,
    episodes: int = 3,
    length: int = 60,
    seed: int = 0,
    nan_at: tuple[int, int] | None = None,
):
    """A dataset shaped like an ordinary arm's (7-dim state = action, random-walk joints, one task) for the
    tests of bad data: `cameras` may be 0, and `nan_at=(frame, dim)` writes one NaN into that frame's
    action (frame counted over the whole dataset)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {f"observation.images.cam{c}": image_feature() for c in range(cameras)}
    for key in ("observation.state", "action"):
        features[key] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    ds = LeRobotDataset.create(repo_id, fps=10, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(seed)
    for ep in range(episodes):
        joints = np.cumsum(rng.normal(0, 0.1, (length, action_dim)), axis=0).astype(np.float32)
        for t in range(length):
            action = joints[t].copy()
            if nan_at is not None and ep * length + t == nan_at[0]:
                action[nan_at[1]] = np.nan
            frame = {f"observation.images.cam{c}": render(c, joints[t], t) for c in range(cameras)}
            ds.add_frame({**frame, "observation.state": joints[t].copy(), "action": action, "task": "move"})
        ds.save_episode()
    ds.finalize()
    return ds
