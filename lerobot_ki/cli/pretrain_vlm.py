"""`lerobot-ki-pretrain-vlm`: pretrain a ki_vla backbone on a VQA corpus and save it as a PaliGemma
checkpoint, so that there is something for knowledge insulation to keep.

    lerobot-ki-pretrain-vlm --corpus data/mw_vqa --output_dir outputs/vlm_tiny

trains the backbone of a ki_vla policy (SigLIP tower + projector + Gemma LM of `--variant`, default
`tiny`) by next-token cross-entropy on the answers of `<corpus>/train` (the same loss VLM co-training
uses: `vlm_cotraining.vlm_loss`), evaluates greedy answers on a fixed slice of `<corpus>/heldout_scenes` every
`--eval_every` steps, and stops when that accuracy has not improved by `--min_delta` for `--patience`
evaluations (or at `--max_steps` / `--max_minutes`). The best evaluated weights are kept, scored on the
full held-out splits (per question type, next to the blind and uniform rates) and written to
`<output_dir>/paligemma` in the transformers PaliGemma layout with the tokenizer:

    lerobot-train --policy.type=ki_vla --policy.paligemma_variant=tiny \\
        --policy.paligemma_pretrained_path=outputs/vlm_tiny/paligemma --policy.image_resolution=[96,96] ...

Also written: `train_log.jsonl` (loss per logged step, accuracy per evaluation), `report.json`,
`accuracy.md` and `curves.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IMAGE_KEY = "observation.image"  # LeRobot's Meta-World camera key: the robot policy's first camera
HELDOUT_SPLITS = ("heldout_scenes", "heldout_tasks")


def build_policy(variant: str, resolution: int, seed: int):
    """A ki_vla policy sized like the robot policy that will load the backbone (Meta-World's features)."""
    from lerobot.configs import FeatureType, PolicyFeature

    from lerobot_ki.configuration_ki import KIConfig
    from lerobot_ki.modeling_ki import KIPolicy

    torch.manual_seed(seed)
    cfg = KIConfig(
        paligemma_variant=variant,
        action_expert_variant="tiny" if variant == "tiny" else "gemma_300m",
        image_resolution=(resolution, resolution),
        device="cpu",
    )
    cfg.input_features = {
        IMAGE_KEY: PolicyFeature(FeatureType.VISUAL, (3, resolution, resolution)),
        "observation.state": PolicyFeature(FeatureType.STATE, (4,)),
    }
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (4,))}
    return KIPolicy(cfg)


class TrainSet:
    """Every training record tokenized once, its image decoded once (shared by its questions)."""

    def __init__(self, folder: Path, policy, tokenizer):
        from lerobot_ki.vlm_accuracy import read_records
        from lerobot_ki.vlm_cotraining import tokenize_example
        from lerobot_ki.vlm_data import image_to_tensor

        self.records = read_records(folder)
        images: dict[Path, torch.Tensor] = {}
        cfg = policy.config
        self.examples = []
        for r in self.records:
            if r.image not in images:
                images[r.image] = (image_to_tensor(r.image) * 255).round().to(torch.uint8)  # compact
            ex = tokenize_example(
                [images[r.image]], r.prompt, r.answer, tokenizer, cfg.tokenizer_max_length, 64, 1
            )
            self.examples.append(ex)

    def batch(self, indices: list[int], pad_id: int):
        from lerobot_ki.vlm_cotraining import TokenizedVLMExample, collate

        chosen = [self.examples[i] for i in indices]
        as_float = [
            TokenizedVLMExample([e.images[0].float() / 255], e.prompt_ids, e.target_ids) for e in chosen
        ]
        return collate(as_float, pad_id)


def evaluate(model, tokenizer, records, reference, batch_size: int, progress: bool = False):
    from lerobot_ki.vlm_accuracy import answer_all, max_answer_tokens, model_generator, score

    gen = model_generator(model, tokenizer, max_answer_tokens(records, tokenizer))
    return score(records, answer_all(gen, records, batch_size, progress), reference)


def every_kth(records: list, n: int) -> list:
    """An evenly spaced slice of `n` records (the splits are in task order: every task is represented)."""
    if n >= len(records):
        return list(records)
    step = len(records) / n
    return [records[int(i * step)] for i in range(n)]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay from `lr` to `min_lr` at `max_steps`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))


def pretrain(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from lerobot_ki.paligemma_export import save_as_paligemma
    from lerobot_ki.text_tokenizer import load_text_tokenizer
    from lerobot_ki.vlm_accuracy import read_records
    from lerobot_ki.vlm_cotraining import vlm_loss

    corpus, out = Path(args.corpus), Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty: pick another --output_dir or pass --overwrite.")
    meta_file = corpus / "corpus.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file} not found: --corpus must be a lerobot-ki-make-vlm-corpus folder."
        )
    meta = json.loads(meta_file.read_text())
    resolution = int(meta["arguments"]["resolution"])
    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("paligemma", "train_log.jsonl", "report.json", "accuracy.md", "curves.png"):
        target = out / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    policy = build_policy(args.variant, resolution, args.seed)
    model, cfg = policy.model, policy.config
    tokenizer = load_text_tokenizer(cfg.text_tokenizer, cfg.fast_vocab_size)
    backbone = model.paligemma_with_expert.paligemma
    # Only the backbone learns (the expert and projections get no loss here); nothing else is saved.
    for p in policy.parameters():
        p.requires_grad_(False)
    params = list(backbone.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    t0 = time.perf_counter()
    train = TrainSet(corpus / "train", policy, tokenizer)
    eval_records = every_kth(read_records(corpus / "heldout_scenes"), args.eval_size)
    logger.info(
        "%d training records, %d held-out records for early stopping", len(train.examples), len(eval_records)
    )
    gen = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    log = (out / "train_log.jsonl").open("w")
    best = {"accuracy": -1.0, "step": 0, "state": None}
    evals_since_best, step, stopped = 0, 0, "max_steps"
    bar = tqdm(total=args.max_steps, desc="pretrain", unit="step", disable=not args.progress)
    policy.train()
    while step < args.max_steps:
        if len(order) < args.batch_size:
            order += torch.randperm(len(train.examples), generator=gen).tolist()
        idx, order = order[: args.batch_size], order[args.batch_size :]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss, info = vlm_loss(model, train.batch(idx, model.layout.pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == 1:
            rec = {
                "step": step,
                "loss": info["vlm_loss"],
                "token_acc": info["vlm_token_acc"],
                "lr": lr_at(step, args),
                "elapsed_s": time.perf_counter() - t0,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{info['vlm_loss']:.3f}", acc=f"{info['vlm_token_acc']:.2f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            policy.eval()
            report = evaluate(model, tokenizer, eval_records, train.records, args.eval_batch_size)
            policy.train()
            acc = report.scores["all"].accuracy
            log.write(
                json.dumps(
                    {
                        "step": step,
                        "eval_accuracy": acc,
                        "per_type": report.as_dict(),
                        "elapsed_s": time.perf_counter() - t0,
                    }
                )
                + "\n"
            )
            log.flush()
            tqdm.write(f"step {step}: held-out accuracy {acc:.1%} (best {max(best['accuracy'], acc):.1%})")
            if acc > best["accuracy"] + args.min_delta:
                best = {"accuracy": acc, "step": step, "state": copy.deepcopy(backbone.state_dict())}
                evals_since_best = 0
            else:
                evals_since_best += 1
                if evals_since_best >= args.patience:
                    stopped = f"plateau: no gain of {args.min_delta:.1%} in {args.patience} evaluations"
                    break
        if (time.perf_counter() - t0) / 60 > args.max_minutes:
            stopped = f"time budget of {args.max_minutes} min"
            break
    bar.close()
    log.close()
    train_minutes = (time.perf_counter() - t0) / 60
    if best["state"] is not None:
        backbone.load_state_dict(best["state"])
    policy.eval()

    result = {
        "corpus": str(corpus),
        "variant": args.variant,
        "resolution": resolution,
        "steps": step,
        "best_step": best["step"],
        "stopped": stopped,
        "train_minutes": train_minutes,
        "arguments": {k: v for k, v in sorted(vars(args).items()) if k != "progress"},
        "splits": {},
    }
    tables = []
    for split in HELDOUT_SPLITS:
        records = read_records(corpus / split)
        report = evaluate(model, tokenizer, records, train.records, args.eval_batch_size, args.progress)
        result["splits"][split] = {"scores": report.as_dict(), "predictions": report.predictions}
        tables.append(f"### {split} ({len(records)} questions)\n\n{report.table()}\n")
    layout = model.layout
    save_as_paligemma(
        backbone,
        layout.text_vocab_size,
        {"pad": layout.pad_id, "bos": layout.bos_id, "eos": layout.eos_id},
        out / "paligemma",
        tokenizer.to_str(),
    )
    (out / "paligemma" / "vlm_pretraining.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "accuracy.md").write_text("\n".join(tables))
    plot_curves(out / "train_log.jsonl", out / "curves.png")
    return result


def plot_curves(log_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    ax[0].set(xlabel="step", ylabel="answer CE", title="training loss", yscale="log")
    types = [t for t in (evals[0]["per_type"] if evals else {}) if t != "all"]
    for t in [*types, "all"]:
        ax[1].plot(
            [r["step"] for r in evals],
            [r["per_type"][t]["accuracy"] for r in evals],
            label=t,
            lw=2.5 if t == "all" else 1.2,
        )
    ax[1].set(
        xlabel="step",
        ylabel="exact-match accuracy",
        title="held-out scenes (early-stopping slice)",
        ylim=(0, 1),
    )
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lerobot-ki-pretrain-vlm",
        description="Pretrain a ki_vla backbone on a lerobot-ki-make-vlm-corpus folder (next-token CE on the "
        "answers) until held-out accuracy plateaus; save it in the transformers PaliGemma layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--corpus", required=True, help="corpus folder (train/, heldout_scenes/, heldout_tasks/)")
    p.add_argument(
        "--output_dir", required=True, help="gets paligemma/, report.json, accuracy.md, curves.png"
    )
    p.add_argument("--variant", default="tiny", help="backbone preset (--policy.paligemma_variant)")
    p.add_argument("--batch_size", type=int, default=32, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_steps", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--max_steps", type=int, default=2000, help="hard step limit (the cosine ends here)")
    p.add_argument("--max_minutes", type=float, default=40.0, help="wall-clock budget for training")
    p.add_argument("--eval_every", type=int, default=250, help="steps between held-out evaluations")
    p.add_argument("--eval_size", type=int, default=500, help="held-out-scene questions per evaluation")
    p.add_argument("--eval_batch_size", type=int, default=128, help="questions answered at once")
    p.add_argument("--patience", type=int, default=3, help="evaluations without gain before stopping")
    p.add_argument("--min_delta", type=float, default=0.005, help="accuracy gain that counts as progress")
    p.add_argument("--log_every", type=int, default=50, help="steps between loss lines in train_log.jsonl")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs in --output_dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = pretrain(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    print((out / "accuracy.md").read_text())
    print(
        f"{result['steps']} steps in {result['train_minutes']:.1f} min (best at step {result['best_step']}; "
        f"stopped: {result['stopped']}). PaliGemma checkpoint: {out / 'paligemma'}; "
        f"curves: {out / 'curves.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
