"""The ablation's report from the finished runs: results.json, table.md, retention.png, curves.png,
language.png."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from arms import ARMS
from drift import FILE as DRIFT_FILE
from language_probe import FILE as LANGUAGE_FILE

from lerobot_ki.metaworld_language import LANGUAGE_TASKS
from lerobot_ki.stats import wilson_interval


def _fmt(values: list[float], pct: bool = True, digits: int = 1) -> str:
    """mean ± sd over seeds (the value alone for one seed, "-" when not measured)."""
    if not values:
        return "-"
    m = statistics.fmean(values)
    scale, unit = (100, "%") if pct else (1, "")
    if len(values) == 1:  # no spread to report from one seed
        return f"{m * scale:.{digits}f}{unit}"
    s = statistics.stdev(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}{unit}"


def _pooled(outcomes: list[bool]) -> str:
    """k/n episodes with the 95% Wilson interval."""
    k, n = sum(outcomes), len(outcomes)
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} [{lo:.0%}, {hi:.0%}]"


def collect(out: Path, arms: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            f = out / "runs" / arm / f"seed{seed}" / "result.json"
            if f.exists():
                run = json.loads(f.read_text())
                for key, name in (("drift", DRIFT_FILE), ("language", LANGUAGE_FILE)):
                    measured = f.with_name(name)  # drift.py's and language_probe.py's, when measured
                    if measured.exists():
                        run[key] = json.loads(measured.read_text())
                runs.setdefault(arm, []).append(run)
    return runs


def _episodes(r: dict, tasks, key: str = "successes") -> list[bool]:
    return [s for t, v in r["success"]["per_task"].items() if t in tasks for s in v.get(key, [])]


def _rate(r: dict, tasks, key: str = "successes") -> float | None:
    e = _episodes(r, tasks, key)
    return sum(e) / len(e) if e else None


def main_table(runs: dict[str, list[dict]], before: dict[str, float] | None) -> str:
    lines = [
        "| arm | seeds | success, all tasks | (pooled episodes, 95% CI) | VQA held-out scenes "
        "| VQA held-out tasks | backbone shift | drift, hidden / expert's K/V (1 - CKA) "
        "| held-out chunk MSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if before:
        lines.append(
            f"| *pretrained VLM, before fine-tuning* | | | | {before['heldout_scenes']:.1%} "
            f"| {before['heldout_tasks']:.1%} | 0 | 0 / 0 | |"
        )
    for arm, rs in runs.items():
        vqa = [r["vqa"] for r in rs if r.get("vqa")]
        shift = [r["backbone_shift"] for r in rs if r.get("backbone_shift") is not None]
        mse = [r["mse_curve"][-1]["mse"] for r in rs if r.get("mse_curve")]
        drift = [r["drift"] for r in rs if r.get("drift")]
        drift_cell = (
            f"{_fmt([d['hidden'] for d in drift], pct=False, digits=3)} / "
            f"{_fmt([d['kv'] for d in drift], pct=False, digits=3)}"
            if drift
            else "-"
        )
        everything = [s for r in rs for s in _episodes(r, r["success"]["per_task"])]
        lines.append(
            f"| {arm} | {len(rs)} | {_fmt([r['success']['rate'] for r in rs])} | {_pooled(everything)} "
            f"| {_fmt([v['heldout_scenes'] for v in vqa])} | {_fmt([v['heldout_tasks'] for v in vqa])} "
            f"| {_fmt(shift, pct=False, digits=3)} | {drift_cell} | {_fmt(mse, pct=False, digits=4)} |"
        )
    return "\n".join(lines)


def language_table(runs: dict[str, list[dict]]) -> str:
    """Success on reach/push/pick-place when their images are identical, how often an episode did another
    of the three tasks (its success condition held at some step) instead of or besides the instructed one,
    and the language probe (language_probe.py): how often the first chunk under an instruction is nearest
    to that task's expert chunk (chance for a policy that ignores the instruction: 1/3), overall and per
    instruction, and how far the instruction moves the chunk against how far sampling does."""
    lines = [
        "| arm | instructed task done | did another task | "
        + " | ".join(LANGUAGE_TASKS)
        + " | probe: nearest = instructed (chance 33.3%) | probe, per instruction | probe: chunk change, "
        "instruction / sampling |",
        "|---|---:|---:|" + "---:|" * len(LANGUAGE_TASKS) + "---:|---:|---:|",
    ]
    for arm, rs in runs.items():
        done = [x for x in (_rate(r, LANGUAGE_TASKS) for r in rs) if x is not None]
        other = [x for x in (_rate(r, LANGUAGE_TASKS, "other_task") for r in rs) if x is not None]
        if not done:
            continue
        cells = [_pooled([s for r in rs for s in _episodes(r, (t,))]) for t in LANGUAGE_TASKS]
        probe = [r["language"] for r in rs if r.get("language")]
        if probe:
            per_instr = [
                _fmt([p["per_instruction_accuracy"][i] for p in probe], digits=0)
                for i in range(len(probe[0]["per_instruction_accuracy"]))
            ]
            across = _fmt([p["change_across_instructions"] for p in probe], pct=False, digits=4)
            within = _fmt([p["change_across_samples"] for p in probe], pct=False, digits=4)
            cells += [_fmt([p["accuracy"] for p in probe]), " / ".join(per_instr), f"{across} / {within}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {arm} | {_fmt(done)} | {_fmt(other)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(runs: dict[str, list[dict]]) -> str:
    tasks = sorted({t for rs in runs.values() for r in rs for t in r["success"]["per_task"]})
    lines = ["| arm | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for arm, rs in runs.items():
        cells = [_pooled([s for r in rs for s in _episodes(r, (t,))]) for t in tasks]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(runs: dict[str, list[dict]], before: dict[str, float] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ki = [a for a in runs if ARMS[a].is_ki_vla and any(r.get("vqa") for r in runs[a])]
    if ki:
        drifted = [a for a in ki if any(r.get("drift") for r in runs[a])]
        fig, ax = plt.subplots(1, 3 if drifted else 2, figsize=(16.5 if drifted else 11, 3.8))
        for i, split in enumerate(("heldout_scenes", "heldout_tasks")):
            for j, arm in enumerate(ki):
                vals = [r["vqa"][split] for r in runs[arm] if r.get("vqa")]
                ax[i].bar(j, statistics.fmean(vals), color="tab:blue" if arm.startswith("ki") else "tab:gray")
                ax[i].scatter([j] * len(vals), vals, color="k", s=10, zorder=3)
            if before:
                ax[i].axhline(before[split], color="tab:green", ls="--", label="pretrained VLM")
                ax[i].legend(loc="lower right")
            ax[i].set_xticks(range(len(ki)), ki, rotation=30, ha="right")
            ax[i].set_ylabel("VQA accuracy")
            ax[i].set_title(split.replace("_", " "))
        series = (("hidden", "last hidden states"), ("kv", "K/V the expert reads"))
        for j, arm in enumerate(drifted):  # what the backbone computes on robot frames, vs the pretrained VLM
            for k, (key, label) in enumerate(series):
                vals = [r["drift"][key] for r in runs[arm] if r.get("drift")]
                x = j + (k - 0.5) * 0.4
                ax[2].bar(x, statistics.fmean(vals), width=0.4, color=("tab:purple", "tab:orange")[k],
                          label=label if j == 0 else None)  # fmt: skip
                ax[2].scatter([x] * len(vals), vals, color="k", s=10, zorder=3)
        if drifted:
            ax[2].set_xticks(range(len(drifted)), drifted, rotation=30, ha="right")
            ax[2].set_ylabel("1 - linear CKA")
            ax[2].set_title("representation drift on held-out robot frames")
            ax[2].legend(loc="upper left", fontsize=8)
        fig.suptitle("Knowledge retained after robot fine-tuning (bars: mean; dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "retention.png", dpi=110)
        plt.close(fig)
    probed = [a for a in runs if any(r.get("language") for r in runs[a])]
    if probed:  # the language probe: overall and per instruction, against the deaf policy's 1/3
        fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(probed) + 2), 3.8))
        series = [("all", None), *((t.removesuffix("-v3"), i) for i, t in enumerate(LANGUAGE_TASKS))]
        width = 0.8 / len(series)
        for j, arm in enumerate(probed):
            probes = [r["language"] for r in runs[arm] if r.get("language")]
            for k, (label, i) in enumerate(series):
                vals = [p["accuracy"] if i is None else p["per_instruction_accuracy"][i] for p in probes]
                x = j + (k - (len(series) - 1) / 2) * width
                ax.bar(x, statistics.fmean(vals), width=width, color=f"C{k}", label=label if j == 0 else None)
                ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
        ax.axhline(1 / 3, color="gray", ls="--", label="deaf to the instruction (1/3)")
        ax.set_xticks(range(len(probed)), probed, rotation=30, ha="right")
        ax.set_ylabel("nearest expert chunk = instructed")
        ax.set_ylim(0, 1.22)  # room for the legend above the bars
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.legend(fontsize=7, ncol=5, loc="upper center")
        ax.set_title("Language probe: same first frame, three instructions (bars: mean; dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "language.png", dpi=110)
        plt.close(fig)
    curves = [a for a in runs if any(r.get("mse_curve") for r in runs[a])]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for arm in curves:
            per_seed = [r["mse_curve"] for r in runs[arm] if r.get("mse_curve")]
            steps = [p["step"] for p in per_seed[0]]
            mean = [statistics.fmean(p[i]["mse"] for p in per_seed) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", label=arm)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out action-chunk MSE")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Training speed (mean over seeds)")
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)


def write_report(out: Path, arms: list[str], seeds: list[int], args) -> None:
    from lerobot_ki.vlm_accuracy import ALL

    runs = collect(out, arms, seeds)
    before = None
    if (out / "vqa_pretrained.json").exists():
        scores = json.loads((out / "vqa_pretrained.json").read_text())["scores"]
        before = {Path(k).name: v["scores"][ALL]["accuracy"] for k, v in scores.items()}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "arguments": {k: str(v) for k, v in vars(args).items()},
    }
    results = {"meta": meta, "vqa_before": before, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(
        [
            f"# Knowledge-insulation ablation ({meta['date']}, {meta['machine']})",
            main_table(runs, before),
            "Language following (reach / push / pick-place with identical images; the probe's "
            "per-instruction accuracy in that order):",
            language_table(runs),
            "Per task, episodes succeeded (seeds pooled, 95% Wilson interval):",
            per_task_table(runs),
        ]
    )
    (out / "table.md").write_text(text + "\n")
    plots(runs, before, out)
    print(text)
