"""Training-time vs guided RTC: how smooth are the commands a rollout sends, as training goes on? Not a test.

Trains two tiny checkpoints on the tests' synthetic dataset that differ only in `rtc_training_max_delay`
(0: LeRobot's guided RTC at rollout; D: training-time RTC, inpainting), saving at each of `--steps`, then
rolls every checkpoint out with `lerobot-rollout --inference.type=rtc` on the simulated robot of
tests/plugins/, with tests/test_rollout.py's command line, and prints the tick-to-tick command jumps
(the largest change of any joint between consecutive ticks: p50, p90, and max after the first second) -
the measure of the test `test_training_time_rtc_joins_chunks_at_least_as_smoothly_as_guided_rtc`.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/rtc_smoothness.py --steps 300,1000,3000 \\
        --work outputs/rtc_smoothness --json outputs/rtc_smoothness/result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from conftest import REPO_ID, run_logged, train_args, venv_script  # noqa: E402
from rollout_setup import FPS, jumps, plugin_env, rollout_cmd, run_rollout  # noqa: E402
from synthetic_dataset import make_dataset  # noqa: E402
from test_rollout import NO_RETURN, RTC_ARGS  # noqa: E402


def offline_env(work: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HF_HOME": str(work / "hf_home")}
    return plugin_env(env, work / "dist")


def train(work: Path, data: Path, delay: int, steps: list[int], seed: int, env: dict) -> Path:
    out = work / f"train_d{delay}_s{seed}"
    last = out / "checkpoints" / f"{max(steps):06d}"
    if not last.exists():  # finished runs are kept: rerunning only rolls out again
        extra = [
            "--batch_size=4",
            f"--steps={max(steps)}",
            f"--save_freq={math.gcd(*steps)}",
            "--log_freq=100",
            f"--seed={seed}",
            f"--policy.rtc_training_max_delay={delay}",
        ]
        cmd = [venv_script("lerobot-train"), *train_args(data, out, *extra)]
        run_logged(cmd, env, work / f"train_d{delay}_s{seed}.log", timeout=6 * 3600)
    return out


def rollout(ckpt: Path, out: Path, seconds: float, env: dict) -> dict:
    cmd = rollout_cmd(
        ckpt, out, "--strategy.type=sentry", "--dataset.video=false", NO_RETURN, *RTC_ARGS, duration=seconds
    )
    run = run_rollout(cmd, env, out, timeout=seconds + 120)
    if run.returncode != 0:
        raise RuntimeError(f"lerobot-rollout failed for {ckpt}:\n{run.tail()}")
    j = jumps(run.commands())
    return {
        "commands": int(len(j) + 1),
        "p50": float(np.percentile(j, 50)),
        "p90": float(np.percentile(j, 90)),
        "max_after_1s": float(j[FPS:].max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="300,1000,3000", help="checkpoints to roll out")
    ap.add_argument(
        "--delay", type=int, default=3, help="rtc_training_max_delay of the training-time RTC run"
    )
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--work", type=Path, default=Path("outputs/rtc_smoothness"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    env = offline_env(args.work)
    data = args.work / "data"
    if not data.exists():
        make_dataset(data, repo_id=REPO_ID)
    rows = []
    for delay, name in ((0, "guided RTC (D = 0)"), (args.delay, f"training-time RTC (D = {args.delay})")):
        out = train(args.work, data, delay, steps, args.seed, env)
        for step in steps:
            ckpt = out / "checkpoints" / f"{step:06d}" / "pretrained_model"
            r = rollout(ckpt, args.work / f"rollout_d{delay}_s{args.seed}_{step}", args.seconds, env)
            rows.append({"sampler": name, "delay": delay, "step": step, "seed": args.seed, **r})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nseed {args.seed}, {args.seconds:.0f} s rollouts at {FPS} Hz, tick-to-tick command jumps:")
    print("| steps | sampler | p50 | p90 | max after 1 s | commands |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["step"], r["delay"])):
        print(
            f"| {r['step']} | {r['sampler']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['max_after_1s']:.2f} "
            f"| {r['commands']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))


if __name__ == "__main__":
    main()
