"""Does knowledge insulation help? The paper's ablations, fine-tuned from our pretrained tiny VLM.

    python examples/ki_ablation/run.py                       # every arm, 3 seeds, CPU default
    python examples/ki_ablation/run.py --arms ki,joint --seeds 0 --steps 200     # a slice
    python examples/ki_ablation/run.py --jobs 2              # two worker processes (1 thread each)

Stages (each skipped when its output exists, so an interrupted experiment continues where it stopped):
1. data: scripted-expert demonstrations of --tasks (train seeds 0.., held-out seeds 500..; evaluation
   uses seeds 1000.., as lerobot-eval; the language probe's first chunks seeds 600..), rendered at the
   policy's resolution without shadows (lerobot_ki/metaworld_render.py); one FAST tokenizer fitted on
   the train demonstrations.
2. the pretrained VLM's held-out VQA accuracy (the "before" of knowledge retention).
3. one run per (arm, seed) under runs/<arm>/seed<k>/: lerobot-train, then held-out chunk MSE at each
   saved checkpoint (training speed), Meta-World success with 95% intervals, VQA accuracy after fine-tuning,
   how far the backbone's weights moved, representation drift (drift.py) and the language probe
   (language_probe.py). Its result.json marks it done.
4. the report: results.json (every run), table.md (mean +- sd over seeds), retention.png, curves.png.

Arms: examples/ki_ablation/arms.py. `--preset real --vlm <PaliGemma folder> --device cuda` builds the same
arms at full size for a GPU; `--train-arg=--policy.X=Y` adds lerobot-train flags to the ki_vla arms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Headless offscreen rendering for the evaluation in this process; must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
# LeRobot's per-step rollout bars would flood the console; the runner prints one line per run.
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "examples" / "metaworld"))

from arms import ARMS, DEFAULT_ARMS, Arm, parse_arms  # noqa: E402
from baselines import reference_policy_flags  # noqa: E402
from drift import pretrained_backbone_state, write_drift  # noqa: E402
from language_probe import PROBE_SEED, PROBED_TYPES, write_language  # noqa: E402
from main_job import (  # noqa: E402
    NORMALIZATION,
    PRESETS,
    Progress,
    console_script,
    parse_train_log,
    run_stage,
    stage_env,
)

from lerobot_ki.metaworld_language import LANGUAGE_TASKS  # noqa: E402

DEFAULT_VLM = REPO / "benchmarks" / "results" / "vlm_tiny_2026-11-26" / "paligemma"
# One standard task and the three language-following ones (the same first frame; only the instruction
# tells them apart: lerobot_ki/metaworld_language.py). Chosen before any arm was evaluated: the main job's
# first task plus the three tasks Meta-World draws identically once their goal markers are hidden.
DEFAULT_TASKS = "button-press-topdown-v3,reach-v3,push-v3,pick-place-v3"
REPO_ID = "local/ki_ablation"
HELDOUT_SEED = 500  # held-out demonstrations; training demos use 0.., evaluation 1000..
EVAL_SEED = 1000
FAST_BUDGET = 64  # max_fast_tokens of the FAST arms (their chunks need at most ~40 tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma list of arms (default: the paper's: {','.join(DEFAULT_ARMS)}; also: "
        f"{','.join(a for a in ARMS if a not in DEFAULT_ARMS)})",
    )
    a("--seeds", default="0,1,2", help="training seeds (comma list; default: %(default)s)")
    a("--tasks", default=DEFAULT_TASKS, help="Meta-World tasks (default: %(default)s)")
    a("--demos-per-task", type=int, default=10, help="expert demonstrations per task (default: %(default)s)")
    a("--heldout-demos-per-task", type=int, default=3, help="for chunk MSE (default: %(default)s)")
    a("--probe-scenes", type=int, default=30, help="language probe scenes (default: %(default)s)")
    a("--steps", type=int, default=600, help="training steps per run (default: %(default)s)")
    a(
        "--checkpoints",
        type=int,
        default=4,
        help="evenly spaced checkpoints for curves (default: %(default)s)",
    )
    a("--batch-size", type=int, default=16, help="default: %(default)s")
    a(
        "--fast-vocab",
        type=int,
        default=1024,
        help="FAST BPE vocabulary fitted on the demonstrations (one per --output-dir; default: %(default)s)",
    )
    a("--chunk-size", type=int, default=20, help="default: %(default)s")
    a("--n-action-steps", type=int, default=5, help="default: %(default)s")
    a("--eval-episodes", type=int, default=5, help="success episodes per task (default: %(default)s)")
    a(
        "--eval-max-steps",
        type=int,
        default=None,
        help="episode cap below Meta-World's 500 (quick checks only)",
    )
    a(
        "--render-size",
        type=int,
        default=96,
        help="rendered frame side, = policy resolution (default: %(default)s)",
    )
    a(
        "--vlm",
        type=Path,
        default=DEFAULT_VLM,
        help="pretrained VLM (PaliGemma layout; default: the committed one)",
    )
    a(
        "--corpus",
        type=Path,
        default=Path("data/mw_vqa"),
        help="VQA corpus of lerobot-ki-make-vlm-corpus "
        "(train/ for co-training, heldout_scenes/ + heldout_tasks/ for retention; default: %(default)s)",
    )
    a("--vqa-limit", type=int, default=300, help="questions per held-out VQA split (default: %(default)s)")
    a("--preset", choices=sorted(PRESETS), default="tiny", help="default: %(default)s")
    a(
        "--train-arg",
        action="append",
        default=[],
        help="extra lerobot-train flag for ki_vla arms (repeatable)",
    )
    a("--device", default="cpu", help="default: %(default)s")
    a("--output-dir", type=Path, default=Path("outputs/ki_ablation"), help="default: %(default)s")
    a("--jobs", type=int, default=1, help="worker processes for the runs (default: %(default)s)")
    a("--shard", default="0/1", help="k/n: do only every n-th run starting at k (set by --jobs)")
    a("--videos", action="store_true", help="save seed 0's evaluation videos (renders every frame twice)")
    a("--report-only", action="store_true", help="only rebuild the report from finished runs")
    return p.parse_args(argv)


def run(cmd: list[str], log: Path) -> None:
    """A stage as a subprocess logging to `log` (main_job's runner), nothing of its output on the console:
    the runner prints one line per run. A failure raises `StageError` (a RuntimeError) with the log's
    tail, so that the run at hand stops and a worker exits non-zero."""
    run_stage(cmd, log, Progress(log.stem, log, write=lambda _text: None))


# ---------------------------------------------------------------------------------------------- data
def record_split(
    out: Path, split: str, tasks: str, seed: int, episodes: int, render_size: int, *extra: str
) -> None:
    """Scripted-expert demonstrations of `tasks` (reach/push/pick-place in their language-following
    variant) as data/<split>, episode k of a task seeded seed + k; recorded once (data/<split>_summary.json
    marks it done)."""
    root, summary = out / "data" / split, out / "data" / f"{split}_summary.json"
    if summary.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            sys.executable,
            str(REPO / "examples" / "metaworld" / "record_dataset.py"),
            *("--tasks", tasks, "--episodes-per-task", str(episodes), "--seed", str(seed)),
            *("--root", str(root), "--repo-id", f"{REPO_ID}_{split}", "--render-size", str(render_size)),
            *("--summary-json", str(summary), "--no-progress", "--hide-goals", *extra),
        ],
        out / "data" / f"record_{split}.log",
    )


def prepare_data(args: argparse.Namespace, out: Path) -> None:
    for split, seed, n in (
        ("train", 0, args.demos_per_task),
        ("heldout", HELDOUT_SEED, args.heldout_demos_per_task),
    ):
        record_split(out, split, args.tasks, seed, n, args.render_size, "--max-attempts-factor", "2")
    prepare_probe(out, args.probe_scenes, args.chunk_size, args.render_size)
    fast_dir = out / "fast_tokenizer"
    if not (fast_dir / "tokenizer.json").exists():
        run(
            [
                console_script("lerobot-ki-fit-fast"),
                f"--dataset.repo_id={REPO_ID}_train",
                f"--dataset.root={out / 'data' / 'train'}",
                f"--chunk_size={args.chunk_size}",
                f"--vocab_size={args.fast_vocab}",
                "--normalization=MIN_MAX",
                f"--output_dir={fast_dir}",
            ],
            out / "data" / "fit_fast.log",
        )


def prepare_probe(out: Path, scenes: int, chunk: int, render_size: int) -> None:
    """The language probe's scenes (language_probe.py): the first `chunk` expert actions of reach, push and
    pick-place at seeds 600.., as PNG frames (lossless: the three tasks' identical first frames stay
    identical). Episodes are cut at `chunk` steps, so none finishes: all are kept."""
    tasks = ",".join(LANGUAGE_TASKS)
    extra = ("--max-steps", str(chunk), "--keep-failed", "--no-videos")
    record_split(out, "probe", tasks, PROBE_SEED, scenes, render_size, *extra)


def vqa_accuracy(checkpoint: Path, args: argparse.Namespace, json_path: Path) -> dict[str, float]:
    """Held-out VQA accuracy per split (all question types) of a checkpoint's backbone."""
    from lerobot_ki.vlm_accuracy import ALL

    if not json_path.exists():
        splits = ",".join(str(args.corpus / s) for s in ("heldout_scenes", "heldout_tasks"))
        run(
            [
                console_script("lerobot-ki-eval-vlm"),
                "--checkpoint",
                str(checkpoint),
                "--data",
                splits,
                "--reference",
                str(args.corpus / "train"),
                "--limit",
                str(args.vqa_limit),
                "--json",
                str(json_path),
                "--no-progress",
            ],
            json_path.with_suffix(".log"),
        )
    scores = json.loads(json_path.read_text())["scores"]
    return {Path(folder).name: s["scores"][ALL]["accuracy"] for folder, s in scores.items()}


# ---------------------------------------------------------------------------------------------- runs
def _log_freq(args: argparse.Namespace) -> int:
    """About 40 loss lines per run (the loss curves in result.json)."""
    return max(1, args.steps // 40)


def train_command(arm: Arm, seed: int, args: argparse.Namespace, out: Path, train_dir: Path) -> list[str]:
    data = out / "data" / "train"
    save_freq = max(1, args.steps // args.checkpoints)
    common = [
        f"--dataset.repo_id={REPO_ID}_train",
        f"--dataset.root={data}",
        f"--policy.device={args.device}",
        "--policy.push_to_hub=false",
        f"--batch_size={args.batch_size}",
        f"--steps={args.steps}",
        f"--save_freq={save_freq}",
        f"--log_freq={_log_freq(args)}",
        "--num_workers=1",
        f"--seed={seed}",
        f"--output_dir={train_dir}",
        "--wandb.enable=false",
    ]
    if not arm.is_ki_vla:
        flags = reference_policy_flags(arm.policy_type, args.chunk_size, args.n_action_steps, args.steps)
        return [console_script("lerobot-train"), *flags, *common]
    cmd = [
        console_script("lerobot-train"),
        "--policy.type=ki_vla",
        *PRESETS[args.preset],
        *arm.flags,
        *common,
        f"--policy.normalization_mapping={NORMALIZATION}",
        f"--policy.chunk_size={args.chunk_size}",
        f"--policy.n_action_steps={args.n_action_steps}",
        "--policy.max_state_dim=8",
        "--policy.max_action_dim=8",
        # A short fine-tune: warm up over the first tenth, decay over the run (LeRobot's cosine schedule).
        f"--policy.scheduler_warmup_steps={max(1, args.steps // 10)}",
        f"--policy.scheduler_decay_steps={args.steps}",
    ]
    if arm.pretrained_backbone:
        cmd.append(f"--policy.paligemma_pretrained_path={args.vlm}")
    if arm.cotrain:
        cmd.append(f"--policy.vlm_dataset={args.corpus / 'train'}")
    if arm.naive_tokens:
        # one token per action dimension and chunk step, plus EOS (Meta-World actions have 4 dims)
        cmd += ["--policy.action_tokenizer=naive", f"--policy.max_fast_tokens={args.chunk_size * 4 + 1}"]
    else:
        # The budget every FAST run of this experiment has used (the default before it was sized from the
        # data): the same sequence layout in every run, whatever the code's default becomes.
        cmd += [
            f"--policy.fast_tokenizer_path={out / 'fast_tokenizer'}",
            f"--policy.max_fast_tokens={FAST_BUDGET}",
        ]
    return cmd + list(args.train_arg)


def backbone_shift(checkpoint: Path, vlm: Path) -> float:
    """||theta - theta_0|| / ||theta_0|| over the backbone's vision tower and language-model layers (token
    embeddings and LM head excluded: their FAST rows start random): how far fine-tuning moved the VLM.
    theta_0 is the pretrained VLM mapped onto ki_vla's names by the importer lerobot-train used."""
    from lerobot_ki.modeling_ki import KIPolicy

    trained = KIPolicy.from_pretrained(checkpoint)
    start = pretrained_backbone_state(vlm, trained)
    now = trained.state_dict()
    num = den = 0.0
    for name, p0 in start.items():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        num += float((now[name].float() - p0.float()).pow(2).sum())
        den += float(p0.float().pow(2).sum())
    if den == 0.0:
        raise RuntimeError(f"no backbone weights of {vlm} matched {checkpoint}")
    return (num / den) ** 0.5


def finished_runs(out: Path) -> Iterator[tuple[Path, Arm, Path]]:
    """(run dir, arm, final checkpoint) of every run under out/runs with a result.json, for the measures
    added after runs were made (drift.py, language_probe.py)."""
    for run_dir in sorted((out / "runs").glob("*/seed*")):
        arm, result = ARMS.get(run_dir.parent.name), run_dir / "result.json"
        if arm is not None and result.exists():
            steps = json.loads(result.read_text())["steps"]
            yield run_dir, arm, run_dir / "train" / "checkpoints" / f"{steps:06d}" / "pretrained_model"


def training_done(train_dir: Path, steps: int) -> bool:
    """Whether lerobot-train saved the checkpoint of the last step. Not `checkpoints/last`: a run killed
    after an intermediate save has that link too, and evaluating it would report a shorter run."""
    return (train_dir / "checkpoints" / f"{steps:06d}" / "pretrained_model").is_dir()


def run_one(arm: Arm, seed: int, args: argparse.Namespace, out: Path) -> None:
    from evaluate import heldout_chunk_errors

    run_dir = out / "runs" / arm.name / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        print(f"[{arm.name} seed {seed}] done already: {result_file}", flush=True)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    train_dir = run_dir / "train"
    train_time = run_dir / "train_seconds.txt"  # survives a resume that skips the finished training
    if not training_done(train_dir, args.steps):
        shutil.rmtree(train_dir, ignore_errors=True)
        t0 = time.perf_counter()
        run(train_command(arm, seed, args, out, train_dir), run_dir / "train.log")
        train_time.write_text(f"{time.perf_counter() - t0:.1f}\n")
    train_s = float(train_time.read_text()) if train_time.exists() else None
    log_freq = _log_freq(args)
    losses = (
        parse_train_log((run_dir / "train.log").read_text(errors="replace"), log_freq)
        if arm.is_ki_vla
        else []
    )
    result: dict = {
        "arm": arm.name,
        "seed": seed,
        "description": arm.description,
        "train_s": train_s,
        "steps": args.steps,
        "losses": losses,
        "command": train_command(arm, seed, args, out, train_dir),
    }
    ckpts = sorted(
        (d for d in (train_dir / "checkpoints").iterdir() if d.name.isdigit()), key=lambda d: int(d.name)
    )
    final = ckpts[-1] / "pretrained_model"
    t0 = time.perf_counter()
    if arm.policy_type in PROBED_TYPES:  # one frame -> one whole chunk: ki_vla and ACT (not Diffusion)
        heldout = out / "data" / "heldout"
        result["mse_curve"] = [
            {
                "step": int(c.name),
                "mse": heldout_chunk_errors(
                    c / "pretrained_model", heldout, f"{REPO_ID}_heldout", device=args.device
                )["mse"],
            }
            for c in ckpts
        ]
    if arm.is_ki_vla:
        result["vqa"] = vqa_accuracy(final, args, run_dir / "vqa.json")
        result["backbone_shift"] = backbone_shift(final, args.vlm) if arm.pretrained_backbone else None
        if arm.pretrained_backbone:  # runs/<arm>/seed<k>/drift.json, which the report reads
            write_drift(run_dir, final, args.vlm, out, REPO_ID, args.device)
    if arm.policy_type in PROBED_TYPES:  # runs/<arm>/seed<k>/language.json, which the report reads
        write_language(run_dir, final, out, REPO_ID, args.device)
    success_json = run_dir / "success.json"
    if not success_json.exists():
        cmd = [
            sys.executable,
            str(REPO / "examples" / "metaworld" / "evaluate.py"),
            "--checkpoint",
            str(final),
            "--tasks",
            args.tasks,
            "--episodes",
            str(args.eval_episodes),
            "--render-size",
            str(args.render_size),
            "--start-seed",
            str(EVAL_SEED),
            "--device",
            args.device,
            "--json",
            str(success_json),
        ]
        if args.videos and seed == 0:
            cmd += ["--videos-dir", str(run_dir / "videos")]
        cmd.append("--hide-goals")
        if args.eval_max_steps:
            cmd += ["--max-steps", str(args.eval_max_steps)]
        run(cmd, run_dir / "eval.log")
    result["success"] = json.loads(success_json.read_text())
    result["eval_s"] = time.perf_counter() - t0
    result_file.write_text(json.dumps(result, indent=1))
    # Keep the final checkpoint only: intermediate ones were needed for the curve alone.
    for c in ckpts[:-1]:
        shutil.rmtree(c, ignore_errors=True)
    s = result["success"]
    print(
        f"[{arm.name} seed {seed}] success {s['rate']:.0%} of {s['n']}; vqa {result.get('vqa')}; "
        f"train {(train_s or float('nan')) / 60:.1f} min, eval {result['eval_s'] / 60:.1f} min",
        flush=True,
    )


def _worker_env(threads: int) -> dict[str, str]:
    """A stage's environment, with the worker's share of the cores (its torch threads)."""
    return {**stage_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output_dir.resolve()
    args.corpus = args.corpus.resolve()
    args.vlm = args.vlm.resolve()
    arms = parse_arms(args.arms)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for arm in arms:  # a reference that cannot take the chunk is refused before any run, not at its turn
        if not arm.is_ki_vla:
            try:
                reference_policy_flags(arm.policy_type, args.chunk_size, args.n_action_steps, args.steps)
            except ValueError as err:
                sys.exit(f"--arms {arm.name}: {err}")
    if not args.report_only:
        if any(a.cotrain for a in arms) and not (args.corpus / "train").is_dir():
            sys.exit(
                f"{args.corpus}/train not found: make the VQA corpus first (README, "
                "lerobot-ki-make-vlm-corpus "
                f"--output_dir {args.corpus}) or point --corpus at it."
            )
        fitted = out / "fast_tokenizer" / "fast_config.json"
        if fitted.exists():
            vocab = json.loads(fitted.read_text()).get("configured_vocab_size")
            if vocab != args.fast_vocab:
                sys.exit(
                    f"{out} holds runs with a FAST vocabulary of {vocab}, not --fast-vocab "
                    f"{args.fast_vocab}: pass --fast-vocab {vocab} to continue them, or another --output-dir "
                    "for a new experiment."
                )
        out.mkdir(parents=True, exist_ok=True)
        prepare_data(args, out)
        if any(a.is_ki_vla for a in arms):
            vqa_accuracy(args.vlm, args, out / "vqa_pretrained.json")
        jobs = [(arm, seed) for seed in seeds for arm in arms]
        if args.jobs > 1:
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        *(argv if argv is not None else sys.argv[1:]),
                        "--jobs",
                        "1",
                        "--shard",
                        f"{k}/{args.jobs}",
                    ],
                    env=_worker_env(max(1, (os.cpu_count() or 2) // args.jobs)),
                )
                for k in range(args.jobs)
            ]
            if any(p.wait() != 0 for p in procs):
                sys.exit("a worker failed; rerun the same command to continue")
        else:
            k, n = (int(x) for x in args.shard.split("/"))
            for arm, seed in jobs[k::n]:
                run_one(arm, seed, args, out)
            if n > 1:
                return 0
    from report import write_report

    write_report(out, [a.name for a in arms], seeds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
