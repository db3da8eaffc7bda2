"""`lerobot-ki-fit-fast`: fit the FAST action tokenizer on a LeRobot dataset, offline.

    lerobot-ki-fit-fast --dataset.repo_id=me/my_dataset --dataset.root=/data/my_dataset \
        --chunk_size=50 --vocab_size=1024 --output_dir=outputs/fast_my_dataset

Then train with `--policy.fast_tokenizer_path=outputs/fast_my_dataset` (otherwise lerobot-train fits one
itself). Actions are normalized exactly as ki_vla's processor does (quantiles by default).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import draccus
from lerobot.configs import NormalizationMode
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.utils.constants import ACTION
from lerobot.utils.feature_utils import dataset_to_policy_features
from tqdm import tqdm

from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.fast_artifacts import load_action_chunks, normalize_action_chunks


@dataclass
class DatasetArgs:
    repo_id: str = ""
    root: str | None = None
    episodes: list[int] | None = None


@dataclass
class FitFastArgs:
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    chunk_size: int = 50
    vocab_size: int = 1024
    scale: float = 10.0
    max_chunks: int = 4000
    normalization: str = "QUANTILES"  # must match the policy's ACTION normalization mode
    output_dir: str = "outputs/fast_tokenizer"
    overwrite: bool = False
    push_to_hub: bool = False
    hub_repo_id: str | None = None


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


@draccus.wrap()
def main(args: FitFastArgs) -> None:
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
