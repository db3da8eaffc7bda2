"""Language following without rollouts: does the instruction steer the first chunk toward its own task?

Success cannot measure it at this budget (the policies rarely finish reach, push or pick-place). This probe
asks less of them. reach-v3, push-v3 and pick-place-v3 in their language-following variant render the same
first frame and state at the same seed (lerobot_ki/metaworld_language.py), so one probe scene gives one
observation and three expert chunks: each scripted expert's first `chunk_size` actions for its task. The
policy predicts a chunk from that observation under each of the three instructions, `samples` times (the
same noise for the three instructions), and each prediction is scored by which expert chunk is nearest
(MSE in the dataset's action units, padding excluded):

- `accuracy`: how often the nearest expert chunk is the instructed task's. A policy that ignores the
  instruction predicts the same chunk under all three (same observation, same noise), so it is right for
  exactly one of them: 1/3. An oracle scores 1.
- `confusion[i][j]`: predictions under instruction i whose nearest expert chunk is task j's.
- `mse_instructed` / `mse_other`: error to the instructed task's expert chunk / mean error to the others'.
- `change_across_instructions` / `change_across_samples`: mean squared difference between two
  predictions for the same scene under two instructions (same noise) / under one instruction with two
  noise draws: how much the instruction moves the chunk, against how much sampling does.

The probe scenes (seeds 600.., neither training, held-out nor evaluation seeds) are recorded once per output
directory by run.py (`data/probe`, PNG frames, so the identical first frames stay identical on disk).

Probed: ki_vla and LeRobot's ACT (which reads no instruction: a check of the null on a real policy).
Not Diffusion Policy: its chunk is the 8 actions it executes from a 16-step horizon over two observation
frames, not a 20-action chunk from one frame, so its score would not be the same measure.

    python examples/ki_ablation/language_probe.py --output-dir outputs/ki_ablation   # runs lacking one
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "metaworld"))

FILE = "language.json"  # per run: runs/<arm>/seed<k>/language.json
PROBE_SEED = 600
SAMPLES = 4
PROBED_TYPES = ("ki_vla", "act")  # policies whose predict_action_chunk maps one frame to the whole chunk


def group_scenes(items: list[dict[str, Any]], tasks: list[str]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """First frames of the probe episodes (dataset items with "task", "action", "action_is_pad"), episode k
    of every task being scene k, -> (observation batch of the S scenes, expert chunks (S, 3, T, D), their
    padding (S, 3, T)), in the order of `tasks` (the instruction strings). Refuses scenes whose tasks do
    not share one observation: then the instruction is not all that tells them apart."""
    per_task = {t: [it for it in items if it["task"] == t] for t in tasks}
    counts = {t: len(v) for t, v in per_task.items()}
    if len(set(counts.values())) != 1 or not counts[tasks[0]]:
        raise ValueError(f"the probe needs the same number of scenes per task, got {counts}")
    keys = [k for k in items[0] if k.startswith("observation.")]
    for s, first in enumerate(per_task[tasks[0]]):
        for t in tasks[1:]:
            differ = [k for k in keys if not torch.equal(first[k], per_task[t][s][k])]
            if differ:
                raise ValueError(
                    f"probe scene {s}: {t!r} and {tasks[0]!r} differ in {differ}. The probe needs the "
                    "language-following variant (record_dataset.py --hide-goals) and lossless frames "
                    "(--no-videos): video compression alone makes identical renders differ."
                )
    obs = {k: torch.stack([it[k] for it in per_task[tasks[0]]]) for k in keys}
    targets = torch.stack([torch.stack([it["action"] for it in per_task[t]]) for t in tasks], dim=1)
    pads = torch.stack([torch.stack([it["action_is_pad"] for it in per_task[t]]) for t in tasks], dim=1)
    return obs, targets, pads


def score(preds: Tensor, targets: Tensor, pads: Tensor) -> dict[str, Any]:
    """preds (I, K, S, T, D): K samples per scene S under each instruction I (I = the number of tasks, in
    the order of targets' second axis); targets (S, I, T, D); pads (S, I, T). See the module's docstring."""
    n_instr, n_samples = preds.shape[:2]
    valid = (~pads)[None, None, :, :, :, None].float()  # (1, 1, S, I, T, 1)
    sq = (preds[:, :, :, None] - targets[None, None]) ** 2  # (I, K, S, I, T, D)
    err = (sq * valid).sum((-1, -2)) / (valid.sum((-1, -2)) * preds.shape[-1])  # (I, K, S, I targets)
    nearest = err.argmin(-1)  # (I, K, S)
    confusion = torch.zeros(n_instr, n_instr, dtype=torch.long)
    for i in range(n_instr):
        confusion[i] = torch.bincount(nearest[i].flatten(), minlength=n_instr)
    eye = torch.eye(n_instr, dtype=torch.bool)
    instructed = torch.stack([err[i, :, :, i] for i in range(n_instr)])  # (I, K, S)
    other = torch.stack([err[i][..., ~eye[i]].mean(-1) for i in range(n_instr)])
    pairs = [(i, j) for i in range(n_instr) for j in range(i + 1, n_instr)]
    across = torch.stack([((preds[i] - preds[j]) ** 2).mean() for i, j in pairs])
    draws = [(a, b) for a in range(n_samples) for b in range(a + 1, n_samples)]
    within = torch.stack([((preds[:, a] - preds[:, b]) ** 2).mean() for a, b in draws]) if draws else None
    return {
        "accuracy": float(confusion.diag().sum() / confusion.sum()),
        "per_instruction_accuracy": (confusion.diag() / confusion.sum(1)).tolist(),
        "confusion": confusion.tolist(),
        "mse_instructed": float(instructed.mean()),
        "mse_other": float(other.mean()),
        "change_across_instructions": float(across.mean()),
        "change_across_samples": float(within.mean()) if within is not None else None,
        "scenes": int(preds.shape[2]),
        "samples": int(n_samples),
    }


def probe_scenes(root: Path, repo_id: str, chunk: int) -> tuple[dict[str, Tensor], Tensor, Tensor, list[str]]:
    """The probe dataset's scenes (`group_scenes`) and the instruction strings, in recording order."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.utils.constants import ACTION

    # Without FFmpeg libraries torchcodec logs a long traceback before LeRobot falls back to PyAV.
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
    fps = LeRobotDataset(repo_id, root=root).fps
    ds = LeRobotDataset(repo_id, root=root, delta_timestamps={ACTION: [i / fps for i in range(chunk)]})
    items = [ds[int(ep["dataset_from_index"])] for ep in ds.meta.episodes]
    instructions = list(dict.fromkeys(it["task"] for it in items))  # recorded task by task, in order
    return (*group_scenes(items, instructions), instructions)


def language_following(
    checkpoint: Path, root: Path, repo_id: str, samples: int = SAMPLES, device: str = "cpu"
) -> dict[str, Any]:
    """`score` of a checkpoint's chunks on the probe scenes, with the instruction strings."""
    from evaluate import load_policy

    policy, pre, post = load_policy(checkpoint, device)
    obs, targets, pads, instructions = probe_scenes(root, repo_id, policy.config.chunk_size)
    n_scenes = targets.shape[0]
    preds = []
    for instruction in instructions:
        per_sample = []
        for s in range(samples):
            policy.reset()
            torch.manual_seed(s)  # the same noise under every instruction
            with torch.no_grad():
                chunk = post(policy.predict_action_chunk(pre({**obs, "task": [instruction] * n_scenes})))
            per_sample.append(chunk.cpu()[..., : targets.shape[-1]])
        preds.append(torch.stack(per_sample))
    return {"instructions": instructions, **score(torch.stack(preds), targets, pads)}


def write_language(
    run_dir: Path, checkpoint: Path, out: Path, repo_id: str, device: str = "cpu"
) -> dict[str, Any]:
    """The run's language.json (computed once; an existing one is read, never rewritten)."""
    path = run_dir / FILE
    if not path.exists():
        result = language_following(checkpoint, out / "data" / "probe", f"{repo_id}_probe", device=device)
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    from run import REPO_ID, finished_runs, prepare_probe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/ki_ablation"))
    p.add_argument("--render-size", type=int, default=96, help="as the runs were recorded (default: 96)")
    p.add_argument("--scenes", type=int, default=30, help="probe scenes, if not recorded yet (default: 30)")
    p.add_argument("--chunk-size", type=int, default=20, help="as the runs were trained (default: 20)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = args.output_dir.resolve()
    prepare_probe(out, args.scenes, args.chunk_size, args.render_size)
    for run_dir, arm, ckpt in finished_runs(out):
        if arm.policy_type not in PROBED_TYPES:
            continue
        lang = write_language(run_dir, ckpt, out, REPO_ID, args.device)
        print(
            f"{run_dir.parent.name} {run_dir.name}: accuracy {lang['accuracy']:.3f} "
            f"(per instruction {', '.join(f'{a:.2f}' for a in lang['per_instruction_accuracy'])})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
