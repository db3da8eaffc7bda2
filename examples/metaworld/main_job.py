"""The main job: Meta-World expert demonstrations -> FAST -> lerobot-train ki_vla -> lerobot-eval.

Every stage uses the real tool a user would run (record_dataset.py, lerobot-ki-fit-fast, lerobot-train,
lerobot-eval); this script only sequences them, times them and summarises the result:

    python examples/metaworld/main_job.py                      # the default: tiny preset, CPU, no network
    python examples/metaworld/main_job.py --tasks button-press-topdown-v3,drawer-open-v3,handle-press-v3 \
        --episodes-per-task 30 --steps 20000 --preset real --device cuda     # scaled up

Outputs (under --output-dir, default outputs/main_job): dataset/, fast_tokenizer/, train/ (checkpoints,
train.log), eval/ (eval_info.json, videos/), losses.png, summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TASKS = "button-press-topdown-v3,drawer-open-v3"
# Meta-World actions are already in [-1, 1], and LeRobot's dataset quantiles are averages of per-episode
# quantiles, which collapse on dims an episode keeps constant (the gripper): min/max is the robust choice.
NORMALIZATION = '{"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}'

PRESETS = {
    # 2-core CPU: ~2.4 steps/s at batch 16 (96x96 images, one camera).
    "tiny": [
        "--policy.paligemma_variant=tiny",
        "--policy.action_expert_variant=tiny",
        "--policy.image_resolution=[96,96]",
        "--policy.tokenizer_max_length=96",
    ],
    # The real PaliGemma 3B + 300M expert (GPU; add --policy.pretrained_path=lerobot/pi05_base to fine-tune).
    "real": [
        "--policy.paligemma_variant=gemma_2b",
        "--policy.action_expert_variant=gemma_300m",
        "--policy.dtype=bfloat16",
        "--policy.gradient_checkpointing=true",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--episodes-per-task", type=int, default=10, help="expert demonstrations per task")
    p.add_argument("--steps", type=int, default=1200, help="training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=20)
    p.add_argument("--n-action-steps", type=int, default=5)
    p.add_argument("--eval-episodes", type=int, default=4, help="evaluation episodes per task")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/main_job"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="redo every stage (default: reuse a dataset/tokenizer already made)",
    )
    return p.parse_args(argv)


def run(cmd: list[str], log: Path) -> None:
    """Runs a stage, streaming its output to `log`; a failure shows the log's tail and stops the job."""
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"stage failed (exit {proc.returncode}); last lines of {log}:\n{tail}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("PYOPENGL_PLATFORM", "egl")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _bin(name: str) -> str:
    """A console script of this environment (next to the running interpreter)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def parse_train_log(text: str, log_freq: int) -> list[dict[str, float]]:
    """The metrics lerobot-train logs every `log_freq` steps (loss, loss_fast_ce, loss_flow, ...). LeRobot
    prints the step rounded ("1K" from 1000 on), so the step is recomputed from the line's position."""
    rows = []
    for line in text.splitlines():
        if "step:" not in line or "loss_flow:" not in line:
            continue
        row = {}
        for key, value in re.findall(r"(\w+):([-+0-9.eE]+[KMB]?)\b", line):
            scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(value[-1], 1)
            try:
                row[key] = float(value.rstrip("KMB")) * scale
            except ValueError:
                continue
        row["step"] = float(log_freq * (len(rows) + 1))
        rows.append(row)
    return rows


def plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [r["loss_fast_ce"] for r in rows], label="FAST CE (backbone)")
    ax[0].set_ylabel("cross-entropy")
    ax[1].plot(steps, [r["loss_flow"] for r in rows], color="tab:orange", label="flow MSE (expert)")
    ax[1].set_ylabel("flow-matching MSE")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle("ki_vla on Meta-World: the two losses of knowledge insulation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output_dir.resolve()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    repo_id = "local/metaworld_main_job"
    data_dir, fast_dir, train_dir, eval_dir = (
        out / n for n in ("dataset", "fast_tokenizer", "train", "eval")
    )
    if args.fresh:
        for d in (data_dir, fast_dir):
            shutil.rmtree(d, ignore_errors=True)
    # Training and evaluation results are never overwritten: a rerun moves the previous ones aside.
    for d in (train_dir, eval_dir):
        if d.exists():
            d.rename(
                d.with_name(f"{d.name}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(d.stat().st_mtime))}")
            )

    t0 = time.perf_counter()
    summary_json = out / "dataset_summary.json"
    if not (data_dir / "meta" / "info.json").exists() or not summary_json.exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        run(
            [sys.executable, str(HERE / "record_dataset.py"), "--tasks", ",".join(tasks),
             "--episodes-per-task", str(args.episodes_per_task), "--root", str(data_dir),
             "--repo-id", repo_id,
             "--seed", str(args.seed), "--summary-json", str(summary_json), "--no-progress"],
            out / "record.log",
        )  # fmt: skip
    expert = json.loads(summary_json.read_text())
    times["record demonstrations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not (fast_dir / "tokenizer.json").exists():
        run(
            [_bin("lerobot-ki-fit-fast"), f"--dataset.repo_id={repo_id}", f"--dataset.root={data_dir}",
             f"--chunk_size={args.chunk_size}", "--vocab_size=1024", "--normalization=MIN_MAX",
             f"--output_dir={fast_dir}"],
            out / "fit_fast.log",
        )  # fmt: skip
    times["fit FAST"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_log = out / "train.log"
    log_freq = max(10, args.steps // 60)
    run(
        [_bin("lerobot-train"), "--policy.type=ki_vla", *PRESETS[args.preset],
         f"--dataset.repo_id={repo_id}", f"--dataset.root={data_dir}",
         f"--policy.fast_tokenizer_path={fast_dir}", f"--policy.normalization_mapping={NORMALIZATION}",
         f"--policy.chunk_size={args.chunk_size}", f"--policy.n_action_steps={args.n_action_steps}",
         "--policy.max_state_dim=8", "--policy.max_action_dim=8",
         f"--policy.device={args.device}", "--policy.push_to_hub=false",
         f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--save_freq={args.steps}",
         f"--log_freq={log_freq}", f"--num_workers={args.num_workers}",
         f"--seed={args.seed}",
         f"--output_dir={train_dir}", "--wandb.enable=false"],
        train_log,
    )  # fmt: skip
    times["train (lerobot-train)"] = time.perf_counter() - t0
    rows = parse_train_log(train_log.read_text(errors="replace"), log_freq)
    plot_losses(rows, out / "losses.png")

    t0 = time.perf_counter()
    run(
        [_bin("lerobot-eval"), f"--policy.path={train_dir / 'checkpoints' / 'last' / 'pretrained_model'}",
         "--env.type=metaworld", f"--env.task={','.join(tasks)}", f"--eval.n_episodes={args.eval_episodes}",
         "--eval.batch_size=1", "--eval.use_async_envs=false", f"--policy.device={args.device}",
         "--seed=1000", f"--output_dir={eval_dir}"],
        out / "eval.log",
    )  # fmt: skip
    times["evaluate (lerobot-eval)"] = time.perf_counter() - t0

    report = format_report(
        tasks, expert, json.loads((eval_dir / "eval_info.json").read_text()), rows, times, args
    )
    (out / "summary.md").write_text(report)
    print(report)
    videos = sorted(eval_dir.glob("videos/**/*.mp4"))
    print(f"loss plot: {out / 'losses.png'}")
    print(f"evaluation videos ({len(videos)}): {videos[0].parent if videos else 'none written'}")
    return 0


def _task_success(eval_info: dict, task: str) -> tuple[float, int]:
    """(success %, episodes) of one task in lerobot-eval's eval_info.json."""
    group = eval_info.get("per_group", {}).get(task) or {}
    if "pc_success" in group:
        return float(group["pc_success"]), int(group.get("n_episodes", 0))
    for entry in eval_info.get("per_task", []):
        if entry.get("task_group") == task or entry.get("task") == task:
            metrics = entry.get("metrics", entry)
            successes = metrics.get("successes", [])
            return 100.0 * sum(successes) / max(len(successes), 1), len(successes)
    return float("nan"), 0


def format_report(tasks, expert, eval_info, rows, times, args) -> str:
    lines = [
        f"## ki_vla ({args.preset} preset) on Meta-World: {args.steps} training steps, "
        f"batch {args.batch_size}",
        "",
        "| task | ki_vla success | eval episodes | scripted expert success | demos |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        pc, n = _task_success(eval_info, task)
        e = expert["tasks"].get(task, {})
        lines.append(
            f"| {task} | {pc:.0f}% | {n} | {100 * e.get('success_rate', float('nan')):.0f}% "
            f"| {e.get('kept', '?')} |"
        )
    overall = eval_info.get("overall", {}).get("pc_success", float("nan"))
    lines += ["", f"overall ki_vla success: {overall:.1f}%", ""]
    if rows:
        first, last = rows[0], rows[-1]
        lines.append(
            f"losses (step {first['step']:.0f} -> {last['step']:.0f}): "
            f"FAST CE {first['loss_fast_ce']:.3f} -> "
            f"{last['loss_fast_ce']:.3f}, flow MSE {first['loss_flow']:.3f} -> {last['loss_flow']:.3f}, "
            f"FAST token accuracy {last.get('fast_token_acc', float('nan')):.2f}"
        )
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines.append(f"| total | {sum(times.values()) / 60:.1f} min |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
