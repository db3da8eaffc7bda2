"""`lerobot-ki-eval-vlm`: how much a checkpoint's backbone knows, per question type.

    lerobot-ki-eval-vlm --checkpoint outputs/ki/checkpoints/last/pretrained_model \
        --data data/mw_vqa/heldout_scenes,data/mw_vqa/heldout_tasks

answers every question of each VQA folder greedily with the backbone (`generate_text`, batched) and
prints exact-match accuracy per question type next to the blind (question-only) and uniform rates
(`lerobot_ki/vlm_accuracy.py`). `--checkpoint` is a ki_vla checkpoint (a `pretrained_model` folder or
a Hub id) or a PaliGemma folder such as the one `lerobot-ki-pretrain-vlm` writes. Run it on the backbone
before and after fine-tuning to see what a training recipe kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


def load_for_eval(checkpoint: str, device: str):
    """(policy, text tokenizer): a KIPolicy whose backbone is the checkpoint's, and the checkpoint's own
    tokenizer (the one its preprocessor saved, else the one its config names)."""
    from lerobot_ki.modeling_ki import KIPolicy
    from lerobot_ki.text_tokenizer import load_text_tokenizer

    path = Path(checkpoint)
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "paligemma":
        policy = _policy_from_paligemma(path, device)
    else:
        policy = KIPolicy.from_pretrained(checkpoint)
        policy.to(device)
        if (path / "policy_preprocessor.json").is_file():
            # A saved tokenizer beats one built from the config's name (a Hub id may be unreachable).
            from lerobot.processor import PolicyProcessorPipeline

            from lerobot_ki.processor_ki import text_tokenizer_of

            pre = PolicyProcessorPipeline.from_pretrained(path, config_filename="policy_preprocessor.json")
            return policy, text_tokenizer_of(pre)
    cfg = policy.config
    return policy, load_text_tokenizer(cfg.text_tokenizer, cfg.fast_vocab_size)


def _policy_from_paligemma(path: Path, device: str):
    """A ki_vla around a PaliGemma checkpoint: the variant and resolution are read from its config, the
    backbone loaded through `--policy.paligemma_pretrained_path`, as lerobot-train would."""
    from lerobot.configs import FeatureType, PolicyFeature
    from tokenizers import Tokenizer

    from lerobot_ki.configuration_ki import BYTE_TOKENIZER, KIConfig
    from lerobot_ki.modeling_ki import KIPolicy
    from lerobot_ki.text_tokenizer import build_byte_tokenizer
    from lerobot_ki.variants import BACKBONE_VARIANTS

    cfg = json.loads((path / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    variant = next(
        (
            name
            for name, size in BACKBONE_VARIANTS.items()
            if (size.width, size.depth) == (text["hidden_size"], text["num_hidden_layers"])
        ),
        None,
    )
    if variant is None:
        raise ValueError(
            f"{path}: no ki_vla backbone variant has width {text['hidden_size']} and depth "
            f"{text['num_hidden_layers']}."
        )
    side = int(vision["image_size"])
    # The folder's tokenizer decides the vocabulary layout: ours (lerobot-ki-pretrain-vlm) carry the
    # byte tokenizer, the real PaliGemma its own.
    saved = path / "tokenizer.json"
    byte = (
        saved.is_file() and Tokenizer.from_file(str(saved)).get_vocab() == build_byte_tokenizer().get_vocab()
    )
    config = KIConfig(
        paligemma_variant=variant,
        action_expert_variant="tiny" if variant == "tiny" else "gemma_300m",
        image_resolution=(side, side),
        paligemma_pretrained_path=str(path),
        text_tokenizer=BYTE_TOKENIZER if byte else str(path),
        device=device,
    )
    config.input_features = {"observation.image": PolicyFeature(FeatureType.VISUAL, (3, side, side))}
    return KIPolicy(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lerobot-ki-eval-vlm",
        description="Exact-match VQA accuracy of a ki_vla checkpoint's backbone, per question type, with "
        "the blind (question-only) and uniform reference rates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="ki_vla checkpoint folder / Hub id, or a PaliGemma folder"
    )
    p.add_argument(
        "--data", required=True, help="comma list of VQA folders (*.jsonl + images), e.g. corpus splits"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="VQA folder for the blind rate; none: the corpus' train/ beside the first --data",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each folder")
    p.add_argument("--batch_size", type=int, default=128, help="questions answered at once")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lerobot_ki.vlm_accuracy import answer_all, max_answer_tokens, model_generator, read_records, score

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folders = [Path(f) for f in args.data.split(",") if f]
    try:
        policy, tokenizer = load_for_eval(args.checkpoint, args.device)
        ref_dir = Path(args.reference) if args.reference else folders[0].parent / "train"
        reference = read_records(ref_dir) if ref_dir.is_dir() and any(ref_dir.glob("*.jsonl")) else None
        results = {}
        policy.eval()
        for folder in folders:
            records = read_records(folder, args.limit)
            gen = model_generator(policy.model, tokenizer, max_answer_tokens(records, tokenizer))
            with torch.no_grad():
                report = score(records, answer_all(gen, records, args.batch_size, args.progress), reference)
            results[str(folder)] = {"scores": report.as_dict(), "predictions": report.predictions}
            print(f"### {folder} ({len(records)} questions)\n\n{report.table()}\n")
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "scores": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
