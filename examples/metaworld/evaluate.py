"""Measures of one trained checkpoint: Meta-World success and held-out demonstration error.

Success runs LeRobot's own evaluation loop (`lerobot_eval.eval_policy_all`: the same seeding, processors,
action queue, termination on success and 500-step cap as `lerobot-eval`) over LeRobot's Meta-World env
built through `create_metaworld_envs`; only the rendering differs (`lerobot_ki/metaworld_render.py`:
frames at the policy's resolution, no shadows), matching the demonstrations' recording, and only the frames
the policy reads are drawn (every n_action_steps-th for ki_vla and ACT; `--every-frame` draws them all and
gives the same episodes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lerobot_ki.stats import format_successes, wilson_interval


def load_policy(checkpoint: Path, device: str):
    """(policy, preprocessor, postprocessor) of a saved LeRobot policy of any type."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    cfg = PreTrainedConfig.from_pretrained(checkpoint)
    cfg.device = device
    policy = get_policy_class(cfg.type).from_pretrained(checkpoint, config=cfg)
    policy.to(device).eval()
    pre, post = make_pre_post_processors(
        cfg, pretrained_path=str(checkpoint), preprocessor_overrides={"device_processor": {"device": device}}
    )
    return policy, pre, post


def frames_read_every(config: Any) -> int:
    """How often (in env steps) the policy reads an observation frame in LeRobot's evaluation loop:
    `n_action_steps` for a policy that sees one observation (n_obs_steps 1) and queues that many
    actions (ki_vla, ACT without temporal ensembling), else every step (Diffusion Policy keeps a
    history of observations; ACT's temporal ensembling predicts at every step)."""
    if getattr(config, "n_obs_steps", 1) != 1 or getattr(config, "temporal_ensemble_coeff", None) is not None:
        return 1
    return max(1, int(getattr(config, "n_action_steps", 1)))


class TasksDone:
    """Language-following bookkeeping for one reach/push/pick-place env: which of the three tasks' success
    conditions held at any step of each evaluated episode (`metaworld_language.tasks_satisfied`), so an
    episode instructed "push" that put the puck at pick-place's goal, or only reached, counts as doing that.
    An evaluated episode starts at a seeded reset (LeRobot's rollout seeds every batch) and ends at the next
    reset: LeRobot's env resets itself right after a success, and the vector env's autoreset steps
    finished envs on until the batch ends; those steps are not counted."""

    def __init__(self, env: Any) -> None:
        from lerobot_ki.metaworld_language import final_state, make_language_following, tasks_satisfied

        self.episodes: list[list[str]] = []
        self._done: set[str] = set()
        self._tracking = False
        sim = make_language_following(env)
        sim_step, env_reset = sim.step, env.reset

        def step(action):
            # The inner step: LeRobot's wrapper resets the env right after a success, so look here.
            out = sim_step(action)
            if self._tracking:
                self._done |= {t for t, ok in tasks_satisfied(*final_state(sim)).items() if ok}
            return out

        def reset(*args, **kwargs):
            self.close_episode()
            self._tracking = kwargs.get("seed") is not None
            return env_reset(*args, **kwargs)

        sim.step, env.reset = step, reset  # instance attributes, found before the class methods

    def close_episode(self) -> None:
        if self._tracking:
            self.episodes.append(sorted(self._done))
        self._done, self._tracking = set(), False


def success_rates(
    checkpoint: Path,
    tasks: list[str],
    n_episodes: int,
    render_size: int,
    start_seed: int = 1000,
    device: str = "cpu",
    videos_dir: Path | None = None,
    max_steps: int | None = None,
    hide_goals: bool = False,
    batch: int = 10,
    max_videos: int | None = None,
    every_frame: bool = False,
    loaded: tuple | None = None,
) -> dict[str, Any]:
    """Per-task and overall success of `n_episodes` episodes per task, seeds start_seed.. (as lerobot-eval
    --seed=start_seed), with per-episode outcomes. With `hide_goals`, reach/push/pick-place run in their
    language-following variant and each of their episodes also lists the tasks it did. Observation frames
    are drawn only on the steps the policy reads them (`frames_read_every`, `FramesOnQuery`), unless
    `every_frame`. `loaded`: the checkpoint's (policy, preprocessor, postprocessor) if already loaded."""
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.envs.factory import make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy_all
    from lerobot.utils.random_utils import set_seed

    from lerobot_ki.metaworld_render import make_cheap_metaworld_envs

    policy, pre, post = loaded or load_policy(checkpoint, device)
    env_cfg = MetaworldEnv(task=",".join(tasks))
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    from lerobot_ki.metaworld_language import LANGUAGE_TASKS

    trackers: dict[str, list[TasksDone]] = {}  # per task, one per env of its vector env

    def adjust(env) -> None:
        if hide_goals and env.task in LANGUAGE_TASKS:
            trackers.setdefault(env.task, []).append(TasksDone(env))

    # All of a task's episodes in one vector env (up to `batch`): the policy runs once per step for all
    # of them, which made evaluation about 3x cheaper here than one env at a time.
    render_every = 1 if every_frame else frames_read_every(policy.config)
    envs = make_cheap_metaworld_envs(
        ",".join(tasks), n_envs=min(n_episodes, batch), size=render_size, max_steps=max_steps, adjust=adjust,
        render_every=render_every,
    )  # fmt: skip
    # per task; by default every episode of the first batch
    n_videos = 0 if not videos_dir else min(n_episodes, batch) if max_videos is None else max_videos
    set_seed(start_seed)
    try:
        with torch.no_grad():
            info = eval_policy_all(
                envs=envs,
                policy=policy,
                env_preprocessor=env_pre,
                env_postprocessor=env_post,
                preprocessor=pre,
                postprocessor=post,
                n_episodes=n_episodes,
                max_episodes_rendered=n_videos,
                videos_dir=videos_dir,
                start_seed=start_seed,
            )
    finally:
        for group in envs.values():
            for vec in group.values():
                vec.close()
    per_task = {}
    for entry in info["per_task"]:
        successes = [bool(s) for s in entry["metrics"]["successes"]]
        k, n = sum(successes), len(successes)
        task = entry["task_group"]
        per_task[task] = {
            "successes": successes,
            "rate": k / n,
            "ci95": wilson_interval(k, n),
            "sum_rewards": [float(r) for r in entry["metrics"]["sum_rewards"]],
        }
        if task in trackers:
            for tracker in trackers[task]:
                tracker.close_episode()
            # Episode b * n_envs + i ran in env i during batch b (LeRobot's seed order).
            rounds = max(len(t.episodes) for t in trackers[task])
            done = [t.episodes[b] for b in range(rounds) for t in trackers[task] if b < len(t.episodes)][:n]
            if len(done) != n:
                raise RuntimeError(f"{task}: {len(done)} episodes tracked for {n} evaluated")
            per_task[task]["tasks_done"] = done
            # Did another of the three tasks instead of (or as well as) the instructed one.
            per_task[task]["other_task"] = [any(t != task for t in d) for d in done]
    all_outcomes = [s for t in per_task.values() for s in t["successes"]]
    k, n = sum(all_outcomes), len(all_outcomes)
    return {"per_task": per_task, "rate": k / n, "n": n, "ci95": wilson_interval(k, n)}


def heldout_frames(
    dataset_root: Path, repo_id: str, chunk: int, n_frames: int = 64, seed: int = 0
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """`n_frames` frames of held-out demonstrations drawn with `seed` (the same frames for every checkpoint):
    the observation batch (as LeRobot's dataloader gives it, with "task"), the expert's next `chunk` actions
    (B, chunk, D) and their padding mask (B, chunk)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.utils.constants import ACTION

    # Without FFmpeg libraries torchcodec logs a long traceback before LeRobot falls back to PyAV.
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
    meta_fps = LeRobotDataset(repo_id, root=dataset_root).fps
    ds = LeRobotDataset(
        repo_id, root=dataset_root, delta_timestamps={ACTION: [i / meta_fps for i in range(chunk)]}
    )
    idx = np.random.default_rng(seed).choice(len(ds), size=min(n_frames, len(ds)), replace=False)
    items = [ds[int(i)] for i in sorted(idx)]
    target = torch.stack([it[ACTION] for it in items])  # (B, chunk, D)
    pad = torch.stack([it["action_is_pad"] for it in items])  # (B, chunk)
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k.startswith("observation.")}
    batch["task"] = [it["task"] for it in items]
    return batch, target, pad


def heldout_chunk_errors(
    checkpoint: Path,
    dataset_root: Path,
    repo_id: str,
    samples: int = 1,
    n_frames: int = 64,
    seed: int = 0,
    device: str = "cpu",
    loaded: tuple | None = None,
) -> dict[str, Any]:
    """Mean squared error (in the dataset's action units, padding excluded) between the action chunks the
    policy predicts and the expert's, on `n_frames` frames of held-out demonstrations (the same frames and
    sampling noise for every checkpoint), for `samples` sampling seeds (seed, seed + 1, ...): "mse" is the
    first seed's (the figure runs report), "mse_per_seed" each one's, "mse_of_mean" the error of the
    samples' mean chunk and "spread" the samples' variance per action value (0 for a deterministic
    policy). For a flow policy the gap between the two errors is what sampling adds to the error."""
    policy, pre, post = loaded or load_policy(checkpoint, device)
    policy.reset()  # nothing queued from an evaluation that ran before on the same policy
    batch, target, pad = heldout_frames(dataset_root, repo_id, policy.config.chunk_size, n_frames, seed)
    preds = []
    for s in range(seed, seed + samples):
        torch.manual_seed(s)
        with torch.no_grad():
            pred = post(policy.predict_action_chunk(pre(batch)))  # (B, chunk, D) in dataset units
        preds.append(pred.cpu()[..., : target.shape[-1]])
    stacked = torch.stack(preds)  # (samples, B, chunk, D)
    per_seed = [float(((p - target) ** 2)[~pad].mean()) for p in stacked]
    return {
        "mse": per_seed[0],
        "mse_per_seed": per_seed,
        "mse_of_mean": float(((stacked.mean(0) - target) ** 2)[~pad].mean()),
        "spread": float(stacked.var(0, correction=0)[~pad].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """`python evaluate.py --checkpoint C --tasks T --episodes N --json F`: success_rates as JSON. The runner
    calls it in a fresh process per checkpoint: MuJoCo's software-EGL contexts accumulate in a process
    and slowed each later evaluation down (measured: 18, 25, then 55 ms per step)."""
    import argparse
    import json
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    # --tasks is read as the recorder reads it (difficulty groups, `metaworld-` prefixes, unknown names
    # refused), so that one --tasks string names the same tasks for recording and evaluation. The
    # recorder sits next to this script, whose folder Python puts on the path.
    from record_dataset import resolve_tasks

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--tasks", required=True, help="comma list of Meta-World tasks or difficulty groups")
    p.add_argument("--episodes", type=int, required=True, help="per task (0: only the held-out error)")
    p.add_argument("--render-size", type=int, required=True)
    p.add_argument("--start-seed", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--videos-dir", type=Path, default=None)
    p.add_argument("--max-videos", type=int, default=None, help="episodes per task written as video")
    p.add_argument(
        "--hide-goals", action="store_true", help="reach/push/pick-place: language-following variant"
    )
    p.add_argument("--heldout-root", type=Path, default=None, help="also: chunk MSE on these demonstrations")
    p.add_argument("--heldout-repo-id", default=None)
    p.add_argument(
        "--heldout-samples",
        type=int,
        default=1,
        help="chunks sampled per held-out frame (seeds 0..): >1 also reports the error of their mean and "
        "their spread",
    )
    p.add_argument(
        "--every-frame",
        action="store_true",
        help="draw every step's observation frame, also those the policy does not read (slower; same result)",
    )
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    result: dict[str, Any] = {}
    loaded = load_policy(args.checkpoint, args.device)  # once, for both measures
    if args.episodes > 0:
        result = success_rates(
            args.checkpoint, resolve_tasks(args.tasks), args.episodes, args.render_size,
            start_seed=args.start_seed, device=args.device, videos_dir=args.videos_dir,
            max_steps=args.max_steps, hide_goals=args.hide_goals, max_videos=args.max_videos,
            every_frame=args.every_frame, loaded=loaded,
        )  # fmt: skip
    if args.heldout_root is not None:
        errors = heldout_chunk_errors(
            args.checkpoint,
            args.heldout_root,
            args.heldout_repo_id,
            args.heldout_samples,
            device=args.device,
            loaded=loaded,
        )
        result["heldout_chunk_mse"] = errors["mse"]
        if args.heldout_samples > 1:
            result["heldout_chunk_errors"] = errors
            print(
                f"held-out chunk MSE: one sample {errors['mse']:.4f}, mean of {args.heldout_samples} samples "
                f"{errors['mse_of_mean']:.4f}, spread {errors['spread']:.4f}"
            )
    args.json.write_text(json.dumps(result, indent=1))
    for task, entry in result.get("per_task", {}).items():
        print(
            f"{task}: {format_successes(sum(entry['successes']), len(entry['successes']))} episodes succeeded"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
