#!/usr/bin/env python
"""Record Meta-World v3 scripted-expert demonstrations as a LeRobot v3 dataset.

The environment is built through LeRobot's own Meta-World integration
(``lerobot.envs.configs.MetaworldEnv`` + ``lerobot.envs.factory.make_env``), i.e. exactly the
code path that ``lerobot-eval --env.type=metaworld --env.task=<task>`` uses: same MT1 task
construction, ``corner2`` camera (moved and flipped by LeRobot), 480x480 RGB frames,
4-dim ``agent_pos`` (hand xyz + gripper opening), seeded object placement, termination on
first success and at most 500 steps. Each frame is stored under the keys a policy sees after
``lerobot.envs.utils.preprocess_observation`` (``observation.image``, ``observation.state``)
together with the expert ``action`` and the natural-language task string LeRobot passes as
``observation["task"]``.

The expert (``metaworld.policies.Sawyer*V3Policy``) needs the raw 39-dim Meta-World
observation, which LeRobot's wrapper does not return; we capture it by hooking the wrapper's
``_format_raw_obs`` on the env instance (the wrapper itself is unchanged).

Example::

    MUJOCO_GL=egl python examples/metaworld/record_dataset.py \
        --tasks reach-v3,button-press-topdown-v3 --episodes-per-task 20 \
        --root /tmp/mw_demo --repo-id local/metaworld_demo --overwrite
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# Headless offscreen rendering; must be set before mujoco is imported anywhere.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np

from lerobot_ki.metaworld_language import LANGUAGE_TASKS, make_language_following

DEFAULT_TASKS = ("reach-v3", "button-press-topdown-v3", "drawer-open-v3", "push-v3")
DEFAULT_REPO_ID = "local/metaworld_expert"
# lerobot-eval seeds episode i of a task with `--seed` (default 1000) + i; keep demo seeds
# away from that range so evaluation uses unseen object placements.
LEROBOT_EVAL_DEFAULT_SEED = 1000
ROBOT_TYPE = "sawyer"
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_opening"]
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper_effort"]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install metaworld==3.0.0 "mujoco<3.4"'
# The same list as scripts/setup_env.sh installs and README names (tests/test_code_layout.py checks).
EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgles2"
RENDER_HINT = (
    "Offscreen rendering failed. Run with MUJOCO_GL=egl (headless, software/GPU EGL) and make sure "
    f"the EGL/Mesa libraries are installed, e.g. on Debian/Ubuntu:\n"
    f"    apt-get update && apt-get install -y --no-install-recommends {EGL_PACKAGES}\n"
    "(MUJOCO_GL=osmesa also works with libosmesa6, but is slower.)"
)


class SimulatorUnavailableError(RuntimeError):
    """Meta-World / MuJoCo (or LeRobot's Meta-World integration) cannot be imported."""


class RenderingUnavailableError(RuntimeError):
    """MuJoCo offscreen rendering does not work in this environment."""


def _import_backend() -> dict[str, Any]:
    """Import the simulator and LeRobot's Meta-World integration, with actionable errors."""
    try:
        import metaworld.policies  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as err:
        raise SimulatorUnavailableError(
            f"Meta-World / MuJoCo is not importable ({err}). Install it with:\n    {INSTALL_HINT}"
        ) from err
    try:
        from lerobot.envs import metaworld as lerobot_metaworld
        from lerobot.envs.configs import MetaworldEnv as MetaworldEnvConfig
        from lerobot.envs.factory import make_env
        from lerobot.envs.utils import preprocess_observation
    except ImportError as err:
        raise SimulatorUnavailableError(
            f"LeRobot's Meta-World integration is not importable ({err}). Install lerobot and {INSTALL_HINT}"
        ) from err
    return {
        "module": lerobot_metaworld,
        "config_cls": MetaworldEnvConfig,
        "make_env": make_env,
        "preprocess_observation": preprocess_observation,
    }


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Parse a comma list of tasks; accepts the ``metaworld-`` prefix and LeRobot's difficulty groups
    (``easy``, ``medium``, ``hard``, ``very_hard``)."""
    lerobot_metaworld = _import_backend()["module"]
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    resolved: list[str] = []
    for item in items:
        name = item.strip().replace("metaworld-", "")
        if not name:
            continue
        expanded = lerobot_metaworld.DIFFICULTY_TO_TASKS.get(name, [name])
        for task in expanded:
            if task not in lerobot_metaworld.TASK_DESCRIPTIONS:
                known = ", ".join(sorted(lerobot_metaworld.TASK_DESCRIPTIONS))
                raise ValueError(f"Unknown Meta-World task '{task}'. Known tasks: {known}")
            if task not in resolved:
                resolved.append(task)
    if not resolved:
        raise ValueError("No Meta-World task given.")
    return resolved


def build_features(env_cfg: Any, use_videos: bool = True) -> dict[str, dict]:
    """Dataset features derived from LeRobot's Meta-World env config.

    ``env_cfg.features`` + ``env_cfg.features_map`` are what ``env_to_policy_features`` uses to
    tell a policy its inputs, so the dataset keys/shapes follow from them: ``pixels/top`` ->
    ``observation.image`` (H, W, 3), ``agent_pos`` -> ``observation.state`` (4,), ``action`` (4,).
    """
    from lerobot.configs import FeatureType

    features: dict[str, dict] = {}
    for key, feature in env_cfg.features.items():
        target = env_cfg.features_map[key]
        shape = tuple(int(s) for s in feature.shape)
        if feature.type is FeatureType.VISUAL:
            features[target] = {
                "dtype": "video" if use_videos else "image",
                "shape": shape,
                "names": ["height", "width", "channel"],
            }
        elif feature.type is FeatureType.ACTION:
            features[target] = {"dtype": "float32", "shape": shape, "names": list(ACTION_NAMES)}
        else:
            features[target] = {"dtype": "float32", "shape": shape, "names": list(STATE_NAMES)}
    # Same bookkeeping columns as lerobot-eval's own rollout recording.
    features["next.reward"] = {"dtype": "float32", "shape": (1,), "names": None}
    features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    features["next.done"] = {"dtype": "bool", "shape": (1,), "names": None}
    return features


def _make_lerobot_env(
    backend: dict[str, Any], task: str, render_size: int | None = None, hide_goals: bool = False
) -> tuple[Any, Any, Any]:
    """Build the env exactly as lerobot-eval does (n_envs=1) and return (config, vec_env, env). With
    `render_size`, the same env renders small, without shadows (lerobot_ki/metaworld_render.py).

    ``hide_goals``: the language-following variant (``lerobot_ki.metaworld_language``): goal marker
    hidden, goal fixed per task, puck start shared by reach/push/pick-place at the same seed."""
    env_cfg = backend["config_cls"](task=task)
    if render_size is None:
        envs = backend["make_env"](env_cfg, n_envs=1, use_async_envs=False)
    else:
        from lerobot_ki.metaworld_render import make_cheap_metaworld_envs

        envs = make_cheap_metaworld_envs(task, n_envs=1, size=render_size)
    vec_env = envs[task][0]
    env = vec_env.envs[0]  # lerobot.envs.metaworld.MetaworldEnv (SyncVectorEnv adds no wrapper)
    if hide_goals and task in LANGUAGE_TASKS:
        make_language_following(env)  # patches the env object in this process; survives every reset
    original_format = env._format_raw_obs

    def _format_and_keep_raw(raw_obs: np.ndarray) -> dict:
        env.last_raw_obs = np.array(raw_obs, dtype=np.float64, copy=True)
        return original_format(raw_obs)

    env._format_raw_obs = _format_and_keep_raw
    return env_cfg, vec_env, env


def _reset_checked(env: Any, seed: int) -> tuple[dict, dict]:
    try:
        obs, info = env.reset(seed=seed)
    except (SimulatorUnavailableError, KeyboardInterrupt):
        raise
    except Exception as err:  # EGL/GLFW/OSMesa failures surface as many exception types
        backend = os.environ.get("MUJOCO_GL", "<unset>")
        raise RenderingUnavailableError(
            f"{RENDER_HINT}\nMUJOCO_GL={backend}; original error: {type(err).__name__}: {err}"
        ) from err
    pixels = obs.get("pixels") if isinstance(obs, dict) else None
    if pixels is None or not isinstance(pixels, np.ndarray) or pixels.ndim != 3:
        raise RenderingUnavailableError(f"{RENDER_HINT}\nThe environment returned no image.")
    return obs, info


def _frame_from_obs(obs: dict, preprocess, features: dict[str, dict]) -> dict[str, np.ndarray]:
    """Map the wrapper observation to dataset keys, using LeRobot's own key mapping."""
    processed = preprocess(obs)  # {observation.image: (1,3,H,W) float, observation.state: (1,4) float}
    frame: dict[str, np.ndarray] = {}
    for key, value in processed.items():
        if key not in features:
            raise RuntimeError(f"Observation key {key!r} from LeRobot's env is not a dataset feature.")
        if features[key]["dtype"] in ("video", "image"):
            frame[key] = obs["pixels"]  # uint8 HWC; loader returns float CHW in [0, 1] like preprocess
        else:
            frame[key] = value[0].numpy().astype(np.float32)
    return frame


def record(
    tasks: str | list[str] | tuple[str, ...] = DEFAULT_TASKS,
    episodes_per_task: int = 20,
    root: str | Path = "data/metaworld_expert",
    repo_id: str = DEFAULT_REPO_ID,
    max_steps: int | None = None,
    seed: int = 0,
    fps: int | None = None,
    keep_failed: bool = False,
    use_videos: bool = True,
    overwrite: bool = False,
    max_attempts_factor: float = 1.0,
    image_writer_threads: int = 4,
    show_progress: bool = True,
    render_size: int | None = None,
    hide_goals: bool = False,
) -> dict[str, Any]:
    """Roll out Meta-World scripted experts through LeRobot's env and write a LeRobot v3 dataset.

    Args:
        tasks: comma string or list of task names (``reach-v3``) or difficulty groups (``easy``).
        episodes_per_task: episodes attempted per task (``max_attempts_factor`` > 1 retries failed
            seeds until ``episodes_per_task`` successful ones are kept or the attempt budget is used).
        root: output directory of the dataset (must not exist unless ``overwrite``).
        max_steps: per-episode step cap; default = LeRobot's ``_max_episode_steps`` (500).
        seed: first reset seed; episode k of every task uses ``seed + k``.
        fps: dataset fps; default = LeRobot's Meta-World env fps (80 = 1 / (frame_skip 5 * 2.5 ms)).
        keep_failed: also keep episodes in which the expert did not succeed.
        use_videos: store frames as MP4 (AV1) videos (default) or as PNG images.
        render_size: render `render_size` px frames without shadows (lerobot_ki/metaworld_render.py,
            ~25x cheaper on CPU) instead of LeRobot's 480 px; policies must be evaluated the same way.
        hide_goals: record reach/push/pick-place in their language-following variant
            (``lerobot_ki.metaworld_language``: no goal marker, a fixed goal per task, the same puck
            start for the three tasks at a seed), so only the task string tells them apart; other
            tasks are recorded unchanged.

    Returns:
        Summary dict with per-task statistics, dataset features, root and repo_id.
    """
    from tqdm.auto import tqdm

    # metaworld.policies warns on every clipped action; the env clips to [-1, 1] anyway (and so do we).
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")

    backend = _import_backend()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    # A torchcodec wheel without matching FFmpeg shared libs makes LeRobot log a long traceback every
    # time it picks a video backend (it then falls back to pyav, which is fine). Keep the output readable.
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)

    task_list = resolve_tasks(tasks)
    if episodes_per_task < 1:
        raise ValueError("episodes_per_task must be >= 1")
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root} already exists; pass overwrite=True / --overwrite to replace it.")
        shutil.rmtree(root)
    max_attempts = max(episodes_per_task, round(episodes_per_task * max_attempts_factor))
    if seed < LEROBOT_EVAL_DEFAULT_SEED < seed + max_attempts:
        logger.warning(
            "Demo seeds %d..%d overlap lerobot-eval's default seeds (%d+): evaluation would replay "
            "training initial states.",
            seed,
            seed + max_attempts - 1,
            LEROBOT_EVAL_DEFAULT_SEED,
        )

    # Fail fast (before anything is written) if offscreen rendering does not work.
    _, probe_vec_env, probe_env = _make_lerobot_env(backend, task_list[0], render_size, hide_goals)
    try:
        _reset_checked(probe_env, seed)
    finally:
        probe_vec_env.close()

    env_cfg0 = backend["config_cls"](task=task_list[0])
    features = build_features(env_cfg0, use_videos=use_videos)
    if render_size is not None:
        for feature in features.values():
            if feature["dtype"] in ("video", "image"):
                feature["shape"] = (render_size, render_size, 3)
    dataset_fps = int(fps if fps is not None else env_cfg0.fps)
    dataset = LeRobotDataset.create(
        repo_id=repo_id,
        fps=dataset_fps,
        features=features,
        root=root,
        robot_type=ROBOT_TYPE,
        use_videos=use_videos,
        image_writer_threads=image_writer_threads,
    )

    summary: dict[str, Any] = {
        "repo_id": repo_id,
        "root": str(root),
        "fps": dataset_fps,
        "hide_goals": [t for t in task_list if hide_goals and t in LANGUAGE_TASKS],
        "tasks": {},
    }
    total_budget = len(task_list) * max_attempts
    bar = tqdm(total=total_budget, desc="episodes", unit="ep", disable=not show_progress)
    try:
        for task in task_list:
            t0 = time.perf_counter()
            _, vec_env, env = _make_lerobot_env(backend, task, render_size, hide_goals)
            description = env.task_description
            # Meta-World raises if stepped past max_path_length (500), which is also lerobot-eval's cap.
            step_cap = min(int(max_steps or env._max_episode_steps), int(env._max_episode_steps))
            expert = backend["module"].TASK_POLICY_MAPPING[task]()
            stats = {
                "task_description": description,
                "attempted": 0,
                "kept": 0,
                "successes": 0,
                "episode_lengths": [],
                "success_lengths": [],
                "env_steps": 0,
                "sim_time_s": 0.0,
            }
            try:
                for k in range(max_attempts):
                    if stats["kept"] >= episodes_per_task:
                        break
                    ep_seed = seed + k
                    t_sim = time.perf_counter()
                    obs, _ = _reset_checked(env, ep_seed)
                    success = False
                    length = 0
                    for t in range(step_cap):
                        action = np.clip(expert.get_action(env.last_raw_obs), -1.0, 1.0).astype(np.float32)
                        frame = _frame_from_obs(obs, backend["preprocess_observation"], features)
                        obs, reward, terminated, truncated, info = env.step(action)
                        success = bool(info.get("is_success", False))
                        done = bool(terminated or truncated or success or t + 1 == step_cap)
                        frame["action"] = action
                        frame["next.reward"] = np.array([reward], dtype=np.float32)
                        frame["next.success"] = np.array([success], dtype=bool)
                        frame["next.done"] = np.array([done], dtype=bool)
                        frame["task"] = description
                        dataset.add_frame(frame)
                        length = t + 1
                        if done:
                            break
                    stats["sim_time_s"] += time.perf_counter() - t_sim
                    stats["env_steps"] += length
                    stats["attempted"] += 1
                    stats["episode_lengths"].append(length)
                    if success:
                        stats["successes"] += 1
                        stats["success_lengths"].append(length)
                    if success or keep_failed:
                        dataset.save_episode()
                        stats["kept"] += 1
                    else:
                        dataset.clear_episode_buffer()
                    bar.update(1)
                    bar.set_postfix(task=task, ok=f"{stats['successes']}/{stats['attempted']}", len=length)
            finally:
                vec_env.close()
            bar.total -= max_attempts - stats["attempted"]
            bar.refresh()
            lengths = stats.pop("episode_lengths")
            s_lengths = stats.pop("success_lengths")
            stats["success_rate"] = stats["successes"] / max(stats["attempted"], 1)
            stats["mean_episode_length"] = float(np.mean(lengths)) if lengths else 0.0
            stats["mean_success_length"] = float(np.mean(s_lengths)) if s_lengths else 0.0
            stats["sim_steps_per_s"] = stats["env_steps"] / max(stats["sim_time_s"], 1e-9)
            stats["wall_time_s"] = time.perf_counter() - t0
            summary["tasks"][task] = stats
    finally:
        bar.close()
        dataset.finalize()

    summary["total_episodes"] = dataset.meta.total_episodes
    summary["total_frames"] = dataset.meta.total_frames
    summary["features"] = {
        k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in dataset.meta.features.items()
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    header = (
        f"{'task':<28}{'attempted':>10}{'kept':>6}{'success':>9}{'mean_len':>10}{'steps/s':>9}{'wall_s':>8}"
    )
    lines = [header, "-" * len(header)]
    for task, s in summary["tasks"].items():
        lines.append(
            f"{task:<28}{s['attempted']:>10}{s['kept']:>6}{s['success_rate']:>9.0%}"
            f"{s['mean_episode_length']:>10.1f}{s['sim_steps_per_s']:>9.1f}{s['wall_time_s']:>8.1f}"
        )
    lines.append(
        f"dataset {summary['repo_id']} at {summary['root']}: {summary['total_episodes']} episodes, "
        f"{summary['total_frames']} frames @ {summary['fps']} fps"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Record Meta-World v3 scripted-expert demos as a LeRobot v3 dataset that matches "
        "`lerobot-eval --env.type=metaworld` observations "
        "(480x480 corner2 image, 4-dim state, 4-dim action).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help="comma list of tasks or difficulty groups"
    )
    p.add_argument("--episodes-per-task", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None, help="per-episode cap; None = LeRobot's 500")
    p.add_argument("--seed", type=int, default=0, help="episode k of each task is reset with seed+k")
    p.add_argument("--root", default="data/metaworld_expert", help="output dataset directory")
    p.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="local dataset name (never pushed)")
    p.add_argument("--fps", type=int, default=None, help="dataset fps; None = LeRobot env fps (80)")
    p.add_argument("--keep-failed", action="store_true", help="also keep episodes the expert failed")
    p.add_argument(
        "--max-attempts-factor",
        type=float,
        default=1.0,
        help=">1: retry new seeds until --episodes-per-task successful episodes (up to factor x attempts)",
    )
    p.add_argument("--no-videos", action="store_true", help="store PNG images instead of MP4 videos")
    p.add_argument(
        "--hide-goals",
        action="store_true",
        help="record reach-v3,push-v3,pick-place-v3 in their language-following variant: goal marker "
        "hidden, goal fixed per task, same puck start for the three tasks at a seed, so the first frames "
        "are identical and only the task string tells them apart (lerobot_ki/metaworld_language.py); "
        "other tasks are recorded unchanged",
    )
    p.add_argument("--overwrite", action="store_true", help="delete --root first if it exists")
    p.add_argument("--image-writer-threads", type=int, default=4)
    p.add_argument("--summary-json", default=None, help="also write the summary dict to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--render-size",
        type=int,
        default=None,
        help="render N px frames without shadows (~25x cheaper on CPU; evaluate the same way); "
        "default: LeRobot's 480 px",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = record(
            tasks=args.tasks,
            episodes_per_task=args.episodes_per_task,
            root=args.root,
            repo_id=args.repo_id,
            max_steps=args.max_steps,
            seed=args.seed,
            fps=args.fps,
            keep_failed=args.keep_failed,
            use_videos=not args.no_videos,
            overwrite=args.overwrite,
            max_attempts_factor=args.max_attempts_factor,
            image_writer_threads=args.image_writer_threads,
            show_progress=not args.no_progress,
            render_size=args.render_size,
            hide_goals=args.hide_goals,
        )
    except (SimulatorUnavailableError, RenderingUnavailableError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
