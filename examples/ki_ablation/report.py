"""The ablation's report from the finished runs: results.json, table.md, retention.png, curves.png."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from arms import ARMS


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], pct: bool = True, digits: int = 1) -> str:
    if not values:
        return "-"
    m, s = _mean_sd(values)
    scale, unit = (100, "%") if pct else (1, "")
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}{unit}"


def collect(out: Path, arms: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            f = out / "runs" / arm / f"seed{seed}" / "result.json"
            if f.exists():
                runs.setdefault(arm, []).append(json.loads(f.read_text()))
    return runs


def table(runs: dict[str, list[dict]], before: dict[str, float] | None) -> str:
    lines = [
        "| arm | seeds | success (mean ± sd over seeds) | pooled episodes, 95% CI | VQA held-out scenes "
        "| VQA held-out tasks | backbone shift | final held-out chunk MSE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if before:
        lines.append(
            f"| pretrained VLM (before fine-tuning) | - | - | - | {before.get('heldout_scenes', float('nan')):.1%} "
            f"| {before.get('heldout_tasks', float('nan')):.1%} | 0 | - |"
        )
    for arm, rs in runs.items():
        ok = sum(sum(t["successes"].count(True) for t in r["success"]["per_task"].values()) for r in rs)
        n = sum(r["success"]["n"] for r in rs)
        from evaluate import wilson_interval

        lo, hi = wilson_interval(ok, n)
        vqa = [r["vqa"] for r in rs if r.get("vqa")]
        shift = [r["backbone_shift"] for r in rs if r.get("backbone_shift") is not None]
        mse = [r["mse_curve"][-1]["mse"] for r in rs if r.get("mse_curve")]
        lines.append(
            f"| {arm} | {len(rs)} | {_fmt([r['success']['rate'] for r in rs])} | {ok}/{n} [{lo:.0%}, {hi:.0%}] "
            f"| {_fmt([v['heldout_scenes'] for v in vqa])} | {_fmt([v['heldout_tasks'] for v in vqa])} "
            f"| {_fmt(shift, pct=False, digits=3)} | {_fmt(mse, pct=False, digits=4)} |"
        )
    return "\n".join(lines)


def per_task_table(runs: dict[str, list[dict]]) -> str:
    tasks = sorted({t for rs in runs.values() for r in rs for t in r["success"]["per_task"]})
    lines = ["| arm | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for arm, rs in runs.items():
        cells = []
        for t in tasks:
            outcomes = [s for r in rs for s in r["success"]["per_task"].get(t, {}).get("successes", [])]
            cells.append(f"{sum(outcomes)}/{len(outcomes)}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(runs: dict[str, list[dict]], before: dict[str, float] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ki = [a for a in runs if ARMS[a].is_ki_vla and any(r.get("vqa") for r in runs[a])]
    if ki:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
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
        fig.suptitle("Knowledge retained after robot fine-tuning (dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "retention.png", dpi=110)
        plt.close(fig)
    curves = [a for a in runs if any(r.get("mse_curve") for r in runs[a])]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for arm in curves:
            steps = [p["step"] for p in runs[arm][0]["mse_curve"]]
            per_seed = [[p["mse"] for p in r["mse_curve"]] for r in runs[arm] if r.get("mse_curve")]
            mean = [statistics.fmean(v) for v in zip(*per_seed, strict=False)]
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
    runs = collect(out, arms, seeds)
    before_file = out / "vqa_pretrained.json"
    before = None
    if before_file.exists():
        from lerobot_ki.vlm_accuracy import ALL

        scores = json.loads(before_file.read_text())["scores"]
        before = {Path(k).name: v["scores"][ALL]["accuracy"] for k, v in scores.items()}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, {platform.system()}",
        "arguments": {k: str(v) for k, v in vars(args).items()},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "vqa_before": before, "runs": runs}, indent=1))
    text = (
        f"# Knowledge-insulation ablation ({meta['date']}, {meta['machine']})\n\n"
        f"{table(runs, before)}\n\nPer task, episodes succeeded (all seeds pooled):\n\n{per_task_table(runs)}\n"
    )
    (out / "table.md").write_text(text)
    plots(runs, before, out)
    print(text)
