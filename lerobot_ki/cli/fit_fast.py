r"""`lerobot-ki-fit-fast`: fit the FAST action tokenizer on a LeRobot dataset, offline.

    lerobot-ki-fit-fast --dataset.repo_id=me/my_dataset --dataset.root=/data/my_dataset \
        --chunk_size=50 --vocab_size=1024 --output_dir=outputs/fast_my_dataset

Then train with `--policy.fast_tokenizer_path=outputs/fast_my_dataset` (otherwise lerobot-train fits one
itself). Actions are normalized exactly as ki_vla's processor does (quantiles by default).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import draccus
import draccus.argparsing
from draccus.help_formatter import SimpleHelpFormatter
from lerobot.configs import NormalizationMode
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.utils.constants import ACTION
from lerobot.utils.feature_utils import dataset_to_policy_features
from tqdm import tqdm

from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.fast_artifacts import load_action_chunks, normalize_action_chunks


@dataclass
class DatasetArgs:
    repo_id: str = ""  # the LeRobot dataset (required), e.g. me/my_dataset or local/my_dataset
    root: str | None = None  # its local directory (None: the Hub cache, downloading if allowed)
    episodes: list[int] | None = None  # episodes to fit on, e.g. [0,1,2] (None: all)


@dataclass
class FitFastArgs:
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    chunk_size: int = 50  # actions per chunk: the policy's --policy.chunk_size
    vocab_size: int = 1024  # BPE vocabulary: the policy's --policy.fast_vocab_size
    scale: float = 10.0  # DCT coefficient scale before rounding: the policy's --policy.fast_scale
    max_chunks: int = 4000  # action chunks sampled from the dataset for the fit
    normalization: str = "QUANTILES"  # must match the policy's ACTION normalization mode
    output_dir: str = "outputs/fast_tokenizer"  # where the tokenizer is saved (must be empty)
    overwrite: bool = False  # allow writing into a non-empty --output_dir
    push_to_hub: bool = False  # also upload --output_dir to the Hub
    hub_repo_id: str | None = None  # the Hub repo for --push_to_hub (None: --output_dir's name)


class _HelpFormatter(SimpleHelpFormatter):
    """draccus' formatter, listing each option once: draccus registers a nested config's `--dataset`
    (config file) option twice and keeps both for the help text."""

    def add_arguments(self, actions) -> None:
        seen: set[tuple[str, ...]] = set()
        unique = []
        for action in actions:
            key = tuple(action.option_strings)
            if key and key in seen:
                continue
            seen.add(key)
            unique.append(action)
        super().add_arguments(unique)


def parse_args(argv: list[str] | None = None) -> FitFastArgs:
    parser = draccus.argparsing.ArgumentParser(
        config_class=FitFastArgs,
        formatter_class=_HelpFormatter,
        prog="lerobot-ki-fit-fast",
        description=__doc__,
    )
    return parser.parse_args(argv)


@dataclass
class _NormConfig:
    """The two fields of a policy config that `normalize_action_chunks` reads."""

    output_features: dict
    normalization_mapping: dict


def fit_from_args(args: FitFastArgs) -> "tuple[FASTTokenizer, dict]":
    if not args.dataset.repo_id:
        raise ValueError("Pass --dataset.repo_id (and --dataset.root for a local dataset).")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pick another --output_dir or pass --overwrite=true.")
    meta = LeRobotDatasetMetadata(args.dataset.repo_id, root=args.dataset.root)
    features = dataset_to_policy_features(meta.features)
    norm = _NormConfig({ACTION: features[ACTION]}, {"ACTION": NormalizationMode(args.normalization)})
    steps = ["load action chunks", "normalize", "fit DCT + BPE", "statistics"]
    with tqdm(total=len(steps), desc="lerobot-ki-fit-fast", unit="stage") as bar:
        bar.set_postfix_str(steps[0])
        raw = load_action_chunks(
            args.dataset.repo_id, args.dataset.root, args.chunk_size, args.max_chunks, args.dataset.episodes
        )
        bar.update()
        bar.set_postfix_str(steps[1])
        chunks = normalize_action_chunks(raw, norm, meta.stats)
        bar.update()
        bar.set_postfix_str(steps[2])
        tok = FASTTokenizer.fit(chunks, vocab_size=args.vocab_size, scale=args.scale)
        bar.update()
        bar.set_postfix_str(steps[3])
        stats = tok.stats(chunks)
        bar.update()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return tok, stats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tok, stats = fit_from_args(args)
    print(f"FAST tokenizer saved to {args.output_dir}")
    for key, value in stats.items():
        print(f"  {key:>14}: {value:.4f}" if isinstance(value, float) else f"  {key:>14}: {value}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo_id = args.hub_repo_id or Path(args.output_dir).name
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=args.output_dir)
        print(f"pushed to the Hub: {repo_id}")


if __name__ == "__main__":
    main()
