"""The main job: Meta-World expert demonstrations -> FAST -> lerobot-train ki_vla -> evaluation.

Every stage runs a real tool (record_dataset.py, lerobot-ki-fit-fast, lerobot-train, evaluate.py, which is
LeRobot's own evaluation loop `eval_policy_all` over LeRobot's Meta-World env); this script only sequences
them, times them and summarises the result:

    python examples/metaworld/main_job.py                      # the default: tiny preset, CPU, no network
    python examples/metaworld/main_job.py --baseline act       # and LeRobot's ACT, same data/budget/seeds
    python examples/metaworld/main_job.py --tasks button-press-topdown-v3,drawer-open-v3,handle-press-v3 \
        --episodes-per-task 30 --steps 20000 --preset real --device cuda     # scaled up

Rendering: demonstrations and evaluation both render frames at the policy's resolution without shadows
(`lerobot_ki/metaworld_render.py`: ~25x cheaper on a CPU than LeRobot's 480 px frames; same task, physics
and success signal). The task set: DEFAULT_TASKS below says how it was chosen.

Flags this script does not know that start with --policy. or --dataset. go to lerobot-train, after (and
replacing) the ones the script sets, e.g. for the real preset offline:

    python examples/metaworld/main_job.py --preset real --device cuda \
        --policy.pretrained_path=$HOME/models/pi05_base \
        --policy.text_tokenizer=$HOME/models/paligemma_tokenizer \
        --policy.max_state_dim=32 --policy.max_action_dim=32

The console shows one condensed progress line now and then per stage (episodes recorded, training steps
with their losses, evaluation batches); each stage's full output goes to a log file.

Outputs (under --output-dir, default outputs/main_job): dataset/, fast_tokenizer/, train/ (checkpoints),
eval/ (success.json, videos/<task>_0/), the stage logs record.log, fit_fast.log, train.log, eval.log,
losses.png, summary.md; with --baseline NAME also train_NAME/, eval_NAME/ and their logs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling scripts (baselines.py), however this one was loaded
    sys.path.insert(0, str(HERE))
from baselines import REFERENCE_FLAGS, reference_policy_flags  # noqa: E402

# The default tasks follow a rule written down before any policy was evaluated on them: the first four
# tasks of Meta-World's "easy" group (LeRobot's DIFFICULTY_TO_TASKS["easy"], 28 tasks) in the order
# random.Random(0).sample(sorted(easy), 28) draws them, skipping a task whose scripted expert fails more
# than 1 of the 10 demonstrations (none was skipped; the record stage prints the experts' successes).
TASK_DRAW_SEED, N_DEFAULT_TASKS, MAX_EXPERT_FAILURES = 0, 4, 1
DEFAULT_TASKS = "window-open-v3,faucet-close-v3,reach-v3,faucet-open-v3"
REPO_ID, HELDOUT_ID = "local/metaworld_main_job", "local/metaworld_main_job_heldout"
EVAL_SEED = 1000  # evaluation episodes use seeds 1000.. (as lerobot-eval --seed=1000); demonstrations 0..
HELDOUT_SEED = 500  # held-out demonstrations (chunk error, never trained on) use seeds 500..
# Meta-World actions are already in [-1, 1], and LeRobot's dataset quantiles are averages of per-episode
# quantiles, which collapse on dims an episode keeps constant (the gripper): min/max is the robust choice.
NORMALIZATION = '{"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}'
# FAST's vocabulary: 256, not FAST's usual 1024. With 40 demonstrations (2564 chunks) a 1024-token BPE
# merges into rare tokens the tiny backbone learns slowly, and under KI the expert reads only what the
# FAST loss teaches the backbone: held-out chunk MSE 0.224 -> 0.167 at 600 steps (README, "What limits
# the tiny recipe").
FAST_VOCAB = 256

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


# The rendered frame side for each preset: the policy's input resolution, so no resize is involved.
RENDER_SIZE = {"tiny": 96, "real": 224}
BASELINES = tuple(REFERENCE_FLAGS)  # LeRobot's policies: act, diffusion (examples/metaworld/baselines.py)
STAGE_LOGS = ("record.log", "fit_fast.log", "train.log", "eval.log")


def task_draw(easy: list[str], seed: int = TASK_DRAW_SEED) -> list[str]:
    """Meta-World's easy tasks in the order the default-task rule draws them (see DEFAULT_TASKS)."""
    return random.Random(seed).sample(sorted(easy), len(easy))


PASS_THROUGH = ("--policy.", "--dataset.")  # unknown flags with these prefixes go to lerobot-train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's flags; `--policy.*` / `--dataset.*` flags it does not know end up in `args.train_extra`
    (handed to lerobot-train), any other unknown flag is an error."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Unknown --policy.* and --dataset.* flags (name=value) are passed on to lerobot-train.",
    )
    p.add_argument(
        "--tasks", default=DEFAULT_TASKS, help="comma-separated Meta-World v3 tasks (default: %(default)s)"
    )
    p.add_argument(
        "--episodes-per-task",
        type=int,
        default=10,
        help="expert demonstrations per task (default: %(default)s)",
    )
    p.add_argument(
        "--heldout-episodes-per-task",
        type=int,
        default=3,
        help="expert demonstrations never trained on, for each policy's chunk error (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=1200, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=20, help="action chunk length (default: %(default)s)")
    p.add_argument(
        "--fast-vocab-size",
        type=int,
        default=FAST_VOCAB,
        help="FAST tokenizer vocabulary (default: %(default)s; README, 'What limits the tiny recipe')",
    )
    p.add_argument(
        "--n-action-steps", type=int, default=5, help="actions executed per chunk (default: %(default)s)"
    )
    p.add_argument(
        "--eval-episodes", type=int, default=10, help="evaluation episodes per task (default: %(default)s)"
    )
    p.add_argument(
        "--render-size",
        type=int,
        default=None,
        help="frame side in px for demonstrations and evaluation (default: the preset's image resolution, "
        f"{RENDER_SIZE})",
    )
    p.add_argument(
        "--baseline",
        default="",
        help=f"comma list of LeRobot policies ({', '.join(BASELINES)}) to train on the same demonstrations "
        "with the same steps, batch and seed, and evaluate on the same episodes (default: none)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, help="dataloader workers (default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/main_job"), help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="redo every stage (default: reuse a dataset/tokenizer already made)",
    )
    args, unknown = p.parse_known_args(argv)
    bad = [f for f in unknown if not (f.startswith(PASS_THROUGH) and "=" in f)]
    if bad:
        p.error(
            f"unrecognized arguments: {' '.join(bad)} (only --policy.<name>=<value> and "
            "--dataset.<name>=<value> are passed on to lerobot-train)"
        )
    args.train_extra = unknown
    args.baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown_baselines = [b for b in args.baselines if b not in BASELINES]
    if unknown_baselines:
        p.error(f"--baseline {','.join(unknown_baselines)}: choose from {', '.join(BASELINES)}")
    for name in args.baselines:  # a reference that cannot take the chunk is refused now, not after ki_vla
        try:
            reference_policy_flags(name, args.chunk_size, args.n_action_steps, args.steps)
        except ValueError as err:
            p.error(f"--baseline {name}: {err}")
    if args.render_size is None:
        args.render_size = RENDER_SIZE[args.preset]
    return args


def merge_flags(base: list[str], extra: list[str]) -> list[str]:
    """`base` without the `--name=` flags that `extra` sets again, then `extra` (the user's value wins)."""
    names = {f.split("=", 1)[0] for f in extra}
    return [f for f in base if f.split("=", 1)[0] not in names] + list(extra)


def _shared_train_flags(args: argparse.Namespace, repo_id: str, data_dir: Path, train_dir: Path,
                        log_freq: int) -> list[str]:  # fmt: skip
    """What every policy of the job trains with: the same data, device, steps, batch and seed."""
    return [
        f"--dataset.repo_id={repo_id}", f"--dataset.root={data_dir}",
        f"--policy.device={args.device}", "--policy.push_to_hub=false",
        f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--save_freq={args.steps}",
        f"--log_freq={log_freq}", f"--num_workers={args.num_workers}",
        f"--seed={args.seed}",
        f"--output_dir={train_dir}", "--wandb.enable=false",
    ]  # fmt: skip


def train_command(args: argparse.Namespace, repo_id: str, data_dir: Path, fast_dir: Path, train_dir: Path,
                  log_freq: int) -> list[str]:  # fmt: skip
    """The lerobot-train command line of ki_vla's training stage."""
    base = [
        "--policy.type=ki_vla", *PRESETS[args.preset],
        f"--policy.fast_tokenizer_path={fast_dir}", f"--policy.fast_vocab_size={args.fast_vocab_size}",
        f"--policy.normalization_mapping={NORMALIZATION}",
        f"--policy.chunk_size={args.chunk_size}", f"--policy.n_action_steps={args.n_action_steps}",
        "--policy.max_state_dim=8", "--policy.max_action_dim=8",
        *_shared_train_flags(args, repo_id, data_dir, train_dir, log_freq),
    ]  # fmt: skip
    return [console_script("lerobot-train"), *merge_flags(base, getattr(args, "train_extra", []))]


def baseline_train_command(args: argparse.Namespace, name: str, repo_id: str, data_dir: Path,
                           train_dir: Path, log_freq: int) -> list[str]:  # fmt: skip
    """lerobot-train for LeRobot's policy `name` on the same data and budget (the --policy.* flags the
    user passes are ki_vla's and do not reach it)."""
    return [
        console_script("lerobot-train"),
        *reference_policy_flags(name, args.chunk_size, args.n_action_steps, args.steps),
        *_shared_train_flags(args, repo_id, data_dir, train_dir, log_freq),
    ]


def record_command(args: argparse.Namespace, tasks: list[str], episodes: int, root: Path, repo_id: str,
                   seed: int) -> list[str]:  # fmt: skip
    """record_dataset.py for `episodes` demonstrations per task from `seed` on, at the job's frame size."""
    return [
        sys.executable, str(HERE / "record_dataset.py"), "--tasks", ",".join(tasks),
        "--episodes-per-task", str(episodes), "--root", str(root), "--repo-id", repo_id,
        "--render-size", str(args.render_size), "--seed", str(seed),
    ]  # fmt: skip


def eval_command(args: argparse.Namespace, checkpoint: Path, tasks: list[str], eval_dir: Path,
                 heldout_dir: Path | None = None) -> list[str]:  # fmt: skip
    """evaluate.py (LeRobot's eval_policy_all, cheap rendering) on the job's tasks and seeds, one video per
    task; with `heldout_dir`, also the chunk error on those demonstrations."""
    heldout = (
        [] if heldout_dir is None else ["--heldout-root", str(heldout_dir), "--heldout-repo-id", HELDOUT_ID]
    )
    return [
        sys.executable, str(HERE / "evaluate.py"), "--checkpoint", str(checkpoint),
        "--tasks", ",".join(tasks), "--episodes", str(args.eval_episodes),
        "--render-size", str(args.render_size), "--start-seed", str(EVAL_SEED), "--device", args.device,
        "--videos-dir", str(eval_dir / "videos"), "--max-videos", "1",
        "--json", str(eval_dir / "success.json"), *heldout,
    ]  # fmt: skip


_TQDM = re.compile(r"^\s*(?P<desc>[^|]*?):?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TRAIN_KEYS = ("loss", "loss_fast_ce", "loss_flow", "fast_token_acc", "updt_s")
_METRIC = re.compile(r"(?:^|\s)([\w/]+):([-+0-9.eE]+[KMB]?)(?=\s|$)")


def _step_metrics(line: str) -> dict[str, str]:
    """name -> value (as printed: "1K", "1.0e-03") of a lerobot-train metrics line, read from "step:" on:
    the log prefix before it ("INFO 2026-11-27 02:17:40 ot_train.py:641") also holds name:number pairs.
    Empty when the line has no "step:"."""
    start = line.find("step:")
    return {} if start < 0 else dict(_METRIC.findall(line[start:]))


class Progress:
    """Condenses one stage's output to a few console lines: training `step:` lines (step and losses),
    tqdm bars (count/total, at most one line per `min_interval` seconds for each bar unless it finishes),
    the lines containing a `keep` string, and a "still running" line after `heartbeat` seconds of console
    silence. Bars are those whose name starts with a `bars` entry, or (bars=None) all but those in `skip`."""

    def __init__(self, stage: str, log: Path, total_steps: int | None = None, keep: tuple[str, ...] = (),
                 bars: tuple[str, ...] | None = None, skip: tuple[str, ...] = ("Running rollout",),
                 min_interval: float = 15.0, heartbeat: float = 120.0, write=None,
                 clock=time.monotonic):  # fmt: skip
        self.stage, self.log, self.total_steps = stage, log, total_steps
        self.keep, self.bars_shown, self.skip = keep, bars, skip
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self.write = write or (lambda text: print(text, flush=True))
        self.clock = clock
        self.start = self.last_print = clock()
        self.bars: dict[str, tuple[str, float]] = {}  # desc -> (last count shown, when)

    def _emit(self, text: str) -> None:
        self.write(f"  [{self.stage} {(self.clock() - self.start) / 60:4.1f} min] {text}")
        self.last_print = self.clock()

    def feed(self, line: str) -> None:
        line = _ANSI.sub("", line).strip()  # nested tqdm bars move the cursor with escape codes
        if not line:
            return
        if "step:" in line and "loss" in line:
            values = _step_metrics(line)
            step = values.get("step", "?")
            if self.total_steps:
                step = f"{step}/{self.total_steps}"
            shown = " ".join(f"{k} {values[k]}" for k in _TRAIN_KEYS if k in values)
            self._emit(f"step {step}  {shown}")
            return
        m = _TQDM.match(line)
        if m:
            desc = m["desc"].strip() or "progress"
            if self.bars_shown is not None:
                if not desc.startswith(self.bars_shown):
                    return
            elif desc.startswith(self.skip):
                return
            count = f"{m['n']}/{m['total']}"
            shown, when = self.bars.get(desc, ("", -1e9))
            done = m["n"] == m["total"]
            if count != shown and (done or self.clock() - when >= self.min_interval):
                self.bars[desc] = (count, self.clock())
                self._emit(f"{desc} {count}")
            return
        if any(k in line for k in self.keep):
            self._emit(line)

    def tick(self) -> None:
        if self.clock() - self.last_print >= self.heartbeat:
            self._emit(f"still running (full output: {self.log})")


class StageError(RuntimeError):
    """A stage exited non-zero; the message ends with the last lines of its log."""


def run(cmd: list[str], log: Path, progress: Progress | None = None) -> None:
    """`run_stage` for this job: a failed stage shows its log's tail and stops the job."""
    try:
        run_stage(cmd, log, progress)
    except StageError as e:
        sys.exit(str(e))


def run_stage(cmd: list[str], log: Path, progress: Progress | None = None) -> None:
    """Runs a stage: its whole output (stdout and stderr, byte for byte) goes to `log`, and `progress`
    shows a condensed view on the console. A failure raises `StageError` with the log's tail."""
    print("$ " + shlex.join(cmd), flush=True)
    print(f"  (full output: {log})", flush=True)
    progress = progress or Progress(log.stem, log)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stage_env())
        fd, pending = proc.stdout.fileno(), b""
        while True:
            ready, _, _ = select.select([fd], [], [], 5.0)
            if not ready:
                progress.tick()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            f.write(chunk)
            f.flush()
            # tqdm redraws with "\r": each redraw counts as a line for the console view.
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in lines:
                progress.feed(line.decode(errors="replace"))
            progress.tick()
        if pending:
            progress.feed(pending.decode(errors="replace"))
        proc.stdout.close()
        returncode = proc.wait()
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise StageError(f"stage failed (exit {returncode}); last lines of {log}:\n{tail}")


def stage_env() -> dict[str, str]:
    """The environment of every stage: headless rendering, offline unless the user says otherwise."""
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("PYOPENGL_PLATFORM", "egl")
    env.setdefault("HF_HUB_OFFLINE", "1")  # a value the user set (e.g. 0 to download weights) is kept
    return env


def console_script(name: str) -> str:
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
        for key, value in _step_metrics(line).items():
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
    repo_id = REPO_ID
    data_dir, fast_dir, heldout_dir = out / "dataset", out / "fast_tokenizer", out / "heldout"
    policies = ["ki_vla", *args.baselines]
    run_dirs = {p: (out / _suffixed("train", p), out / _suffixed("eval", p)) for p in policies}
    if args.fresh:
        for d in (data_dir, fast_dir, heldout_dir):
            shutil.rmtree(d, ignore_errors=True)
    # A dataset recorded at another frame size cannot be reused: the policy would train on other frames.
    summary_json = out / "dataset_summary.json"
    if summary_json.exists() and json.loads(summary_json.read_text()).get("render_size") != args.render_size:
        print(f"  the dataset in {data_dir} was rendered at another size: moved aside, recording again")
        for d in (data_dir, fast_dir, heldout_dir, summary_json):
            move_aside(d)
    # Training and evaluation results are never overwritten: a rerun moves the previous ones aside.
    for d in (d for pair in run_dirs.values() for d in pair):
        move_aside(d)

    n_stages = 2 + 2 * len(policies)
    t0 = time.perf_counter()
    print(
        f"[1/{n_stages}] record expert demonstrations ({args.episodes_per_task} per task: "
        f"{', '.join(tasks)}; {args.render_size} px frames)"
    )
    if not (data_dir / "meta" / "info.json").exists() or not summary_json.exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        log = out / "record.log"
        cmd = record_command(args, tasks, args.episodes_per_task, data_dir, repo_id, args.seed)
        run([*cmd, "--summary-json", str(summary_json)], log,
            Progress("record", log, keep=("frames @", "error:"), bars=("episodes",)))  # fmt: skip
        summary = json.loads(summary_json.read_text())
        summary_json.write_text(json.dumps({**summary, "render_size": args.render_size}, indent=2))
    else:
        print(f"  reusing {data_dir} (--fresh to record again)")
    expert = json.loads(summary_json.read_text())
    if args.heldout_episodes_per_task > 0 and not (heldout_dir / "meta" / "info.json").exists():
        shutil.rmtree(heldout_dir, ignore_errors=True)
        log = out / "record_heldout.log"
        print(
            f"  held-out demonstrations ({args.heldout_episodes_per_task} per task, seeds {HELDOUT_SEED}..)"
        )
        cmd = record_command(
            args, tasks, args.heldout_episodes_per_task, heldout_dir, HELDOUT_ID, HELDOUT_SEED
        )
        run([*cmd, "--no-progress"], log, Progress("record", log, keep=("frames @", "error:"), bars=()))
    times["record demonstrations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[2/{n_stages}] fit the FAST tokenizer")
    fitted = fast_fit(fast_dir)
    if fitted is not None and fitted != (args.chunk_size, args.fast_vocab_size):
        print(f"  the FAST tokenizer in {fast_dir} was fitted for (chunk, vocabulary) {fitted}: moved aside")
        move_aside(fast_dir)
        fitted = None
    if fitted is None:
        log = out / "fit_fast.log"
        run(
            [console_script("lerobot-ki-fit-fast"), f"--dataset.repo_id={repo_id}",
             f"--dataset.root={data_dir}", f"--chunk_size={args.chunk_size}",
             f"--vocab_size={args.fast_vocab_size}",
             "--normalization=MIN_MAX", f"--output_dir={fast_dir}"],
            log, Progress("fit FAST", log, keep=("saved to", "mean_tokens", "recon_mae"), bars=()),
        )  # fmt: skip
    else:
        print(f"  reusing {fast_dir} (--fresh to fit again)")
    times["fit FAST"] = time.perf_counter() - t0

    log_freq = max(10, args.steps // 60)
    results: dict[str, dict] = {}
    rows: list[dict[str, float]] = []
    for i, policy in enumerate(policies):
        train_dir, eval_dir = run_dirs[policy]
        train_log, eval_log = (out / f"{_suffixed(n, policy)}.log" for n in ("train", "eval"))
        stage = 3 + 2 * i
        t0 = time.perf_counter()
        if policy == "ki_vla":
            print(f"[{stage}/{n_stages}] train ki_vla ({args.preset} preset, {args.steps} steps, batch "
                  f"{args.batch_size})")  # fmt: skip
            cmd = train_command(args, repo_id, data_dir, fast_dir, train_dir, log_freq)
        else:
            print(f"[{stage}/{n_stages}] train LeRobot's {policy} (reference: same data, {args.steps} steps, "
                  f"batch {args.batch_size}, seed {args.seed})")  # fmt: skip
            cmd = baseline_train_command(args, policy, repo_id, data_dir, train_dir, log_freq)
        run(cmd, train_log, Progress("train", train_log, total_steps=args.steps,
                                     keep=("FAST fitted", "Weights from"), bars=()))  # fmt: skip
        times[f"train {policy} (lerobot-train)"] = time.perf_counter() - t0
        if policy == "ki_vla":
            rows = parse_train_log(train_log.read_text(errors="replace"), log_freq)
            plot_losses(rows, out / "losses.png")

        t0 = time.perf_counter()
        checkpoint = train_dir / "checkpoints" / "last" / "pretrained_model"
        print(f"[{stage + 1}/{n_stages}] evaluate {policy} in Meta-World ({args.eval_episodes} episodes per "
              f"task, seeds from {EVAL_SEED})")  # fmt: skip
        eval_dir.mkdir(parents=True)
        progress = Progress("evaluate", eval_log, min_interval=30.0, keep=("episodes succeeded",),
                            bars=("Stepping through eval batches",))  # fmt: skip
        heldout = heldout_dir if args.heldout_episodes_per_task > 0 else None
        run(eval_command(args, checkpoint, tasks, eval_dir, heldout), eval_log, progress)
        times[f"evaluate {policy}"] = time.perf_counter() - t0
        results[policy] = {
            "checkpoint": checkpoint,
            "success": json.loads((eval_dir / "success.json").read_text()),
        }

    report = format_report(tasks, expert, results, rows, times, args)
    (out / "summary.md").write_text(report)
    print(report)
    videos = video_folders([eval_dir for _, eval_dir in run_dirs.values()])
    print(format_outputs(out, {p: r["checkpoint"] for p, r in results.items()}, videos))
    return 0


def fast_fit(fast_dir: Path) -> tuple[int, int] | None:
    """(chunk size, vocabulary size) the FAST tokenizer saved in `fast_dir` was fitted for, or None."""
    config = fast_dir / "fast_config.json"
    if not (fast_dir / "tokenizer.json").exists() or not config.exists():
        return None
    saved = json.loads(config.read_text())
    return saved["chunk_size"], saved["configured_vocab_size"]


def move_aside(path: Path) -> None:
    """Renames an existing `path` to `<name>.<its modification time>` (nothing the job made is deleted)."""
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"{path.name}.{stamp}"))


def _suffixed(name: str, policy: str) -> str:
    """ki_vla's stage folders and logs keep plain names (train/, eval.log); a baseline's are suffixed."""
    return name if policy == "ki_vla" else f"{name}_{policy}"


def video_folders(eval_dirs: list[Path]) -> list[Path]:
    """Every folder holding evaluation videos (one per task and policy: <eval dir>/videos/<task>_0/)."""
    return sorted({p.parent for d in eval_dirs for p in d.glob("videos/**/*.mp4")})


def format_outputs(out: Path, checkpoints: dict[str, Path], folders: list[Path]) -> str:
    lines = [
        "outputs:",
        f"  summary:     {out / 'summary.md'}",
        f"  loss plot:   {out / 'losses.png'}",
        *(f"  checkpoint ({policy}): {path}" for policy, path in checkpoints.items()),
        f"  stage logs:  {', '.join(str(out / n) for n in STAGE_LOGS)}",
    ]
    if folders:
        lines.append(f"  evaluation videos ({len(folders)} folders):")
        lines += [f"    {f}" for f in folders]
    else:
        lines.append("  evaluation videos: none written")
    return "\n".join(lines)


def format_report(tasks: list[str], expert: dict, results: dict[str, dict], rows: list[dict[str, float]],
                  times: dict[str, float], args: argparse.Namespace) -> str:  # fmt: skip
    """summary.md: per task and overall, each policy's successes (k/n with the 95% Wilson interval) side by
    side, the experts' successes, ki_vla's losses and each stage's wall time. `results`: policy ->
    {"success": evaluate.py's JSON, "checkpoint": path}."""
    from lerobot_ki.stats import format_successes

    policies = list(results)
    lines = [
        f"## ki_vla ({args.preset} preset) on Meta-World: {args.steps} training steps, "
        f"batch {args.batch_size}, seed {args.seed}",
        "",
        f"Successes are episodes k/n (seeds {EVAL_SEED}..) with the 95% Wilson interval of the rate; every "
        f"policy trained on the same demonstrations with the same steps and batch, evaluated on the same "
        f"episodes ({args.render_size} px frames).",
        "",
        "| task | " + " | ".join(f"{p} success" for p in policies) + " | scripted expert success | demos |",
        "|---|" + "---|" * (len(policies) + 2),
    ]
    for task in tasks:
        cells = []
        for p in policies:
            outcomes = results[p]["success"]["per_task"].get(task, {}).get("successes", [])
            cells.append(format_successes(sum(outcomes), len(outcomes)))
        e = expert["tasks"].get(task, {})
        expert_cell = format_successes(int(e["successes"]), int(e["attempted"])) if "attempted" in e else "?"
        lines.append(f"| {task} | {' | '.join(cells)} | {expert_cell} | {e.get('kept', '?')} |")
    overall = []
    for p in policies:
        outcomes = [o for t in results[p]["success"]["per_task"].values() for o in t["successes"]]
        overall.append(format_successes(sum(outcomes), len(outcomes)))
    lines.append(f"| **all tasks** | {' | '.join(overall)} | | |")
    mse = [results[p]["success"].get("heldout_chunk_mse") for p in policies]
    if any(m is not None for m in mse):
        cells = " | ".join("" if m is None else f"{m:.4f}" for m in mse)
        lines.append(f"| held-out chunk MSE (action units) | {cells} | | |")
    lines.append("")
    if rows:
        first, last = rows[0], rows[-1]
        lines.append(
            f"ki_vla losses (step {first['step']:.0f} -> {last['step']:.0f}): "
            f"FAST CE {first['loss_fast_ce']:.3f} -> "
            f"{last['loss_fast_ce']:.3f}, flow MSE {first['loss_flow']:.3f} -> {last['loss_flow']:.3f}, "
            f"FAST token accuracy {last.get('fast_token_acc', float('nan')):.2f}"
        )
        lines.append("")
    lines += [f"checkpoint ({p}): `{r['checkpoint']}`" for p, r in results.items()]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines.append(f"| total | {sum(times.values()) / 60:.1f} min |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
