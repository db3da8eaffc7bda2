"""How much a backbone knows: exact-match accuracy of its greedy answers on a VQA set, per question type,
next to what a model that never looks at the image would score.

The eval set is a folder `--policy.vlm_dataset` reads (`*.jsonl` + images) whose records may carry a
`type` (question type; `all` when absent). Answers are compared after `normalize_answer` (case, blanks,
final full stop). Two reference rates per type:
- `uniform`: 1 / the number of distinct answers of that type in the eval set (guessing among them);
- `blind`: answering every prompt with the most frequent answer to that exact prompt in a reference set
  (the training split when given, else the eval set itself): the best a model can do from the question
  alone (e.g. "Where is the handle?" already says the scene has a handle).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lerobot_ki.scene_questions import normalize_answer
from lerobot_ki.vlm_data import image_to_tensor

ALL = "all"


@dataclass
class VQARecord:
    image: Path
    prompt: str
    answer: str
    type: str


@dataclass
class TypeScore:
    n: int = 0
    correct: int = 0
    uniform: float = 0.0
    blind: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class VQAReport:
    scores: dict[str, TypeScore] = field(default_factory=dict)  # per question type, plus ALL
    predictions: list[str] = field(default_factory=list)  # in record order

    def as_dict(self) -> dict:
        return {
            t: {
                "n": s.n,
                "correct": s.correct,
                "accuracy": s.accuracy,
                "uniform": s.uniform,
                "blind": s.blind,
            }
            for t, s in self.scores.items()
        }

    def table(self) -> str:
        lines = [
            "| question type | n | accuracy | blind (question only) | uniform |",
            "|---|---:|---:|---:|---:|",
        ]
        for t, s in self.scores.items():
            name = f"**{t}**" if t == ALL else t
            lines.append(f"| {name} | {s.n} | {s.accuracy:.1%} | {s.blind:.1%} | {s.uniform:.1%} |")
        return "\n".join(lines)


def read_records(folder: str | Path, limit: int | None = None) -> list[VQARecord]:
    """The records of every `*.jsonl` in `folder` (sorted files, line order), the first `limit` if given."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"No *.jsonl files in {folder}: pass a split folder of the VQA corpus.")
    out: list[VQARecord] = []
    for file in files:
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            image = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
            out.append(VQARecord(folder / image, rec["prompt"], rec["answer"], rec.get("type", ALL)))
            if limit is not None and len(out) == limit:
                return out
    return out


def blind_answers(reference: list[VQARecord]) -> dict[str, str]:
    """prompt -> its most frequent answer in `reference` (ties: the alphabetically first)."""
    by_prompt: dict[str, Counter] = defaultdict(Counter)
    for r in reference:
        by_prompt[r.prompt][normalize_answer(r.answer)] += 1
    return {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in by_prompt.items()}


def score(
    records: list[VQARecord], predictions: list[str], reference: list[VQARecord] | None = None
) -> VQAReport:
    """Per-type accuracy of `predictions` (one per record) with the two reference rates."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records.")
    blind = blind_answers(reference if reference is not None else records)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.type].append(i)
    report = VQAReport(predictions=list(predictions))
    for t in [*sorted(groups), ALL]:
        idx = groups[t] if t != ALL else list(range(len(records)))
        truth = [normalize_answer(records[i].answer) for i in idx]
        s = TypeScore(n=len(idx))
        s.correct = sum(normalize_answer(predictions[i]) == a for i, a in zip(idx, truth, strict=True))
        s.blind = sum(blind.get(records[i].prompt) == a for i, a in zip(idx, truth, strict=True)) / max(
            1, len(idx)
        )
        if t != ALL:
            s.uniform = 1.0 / max(1, len(set(truth)))
        report.scores[t] = s
    if len(groups) > 1:
        # The overall uniform rate: the type-weighted mean of each type's.
        report.scores[ALL].uniform = sum(report.scores[t].uniform * len(groups[t]) for t in groups) / len(
            records
        )
    else:
        report.scores[ALL].uniform = next(iter(report.scores.values())).uniform
    return report


def answer_all(
    generate: Callable[[list[torch.Tensor], list[str]], list[str]],
    records: list[VQARecord],
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to every record, `batch_size` at a time. `generate(images, prompts)` takes a list of
    (3, H, W) images in [0, 1] (one camera) and returns one string per image."""
    from tqdm import tqdm

    answers: list[str] = []
    cache: dict[Path, torch.Tensor] = {}  # one image serves several questions
    bar = tqdm(total=len(records), desc="VQA", unit="q", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = []
        for r in chunk:
            if r.image not in cache:
                cache[r.image] = image_to_tensor(r.image)
            images.append(cache[r.image])
        answers += generate(images, [r.prompt for r in chunk])
        bar.update(len(chunk))
    bar.close()
    return answers


def model_generator(
    model, tokenizer, max_new_tokens: int
) -> Callable[[list[torch.Tensor], list[str]], list[str]]:
    """`generate` for `answer_all` from a `KIModel` and its text tokenizer (`generate_text`, greedy):
    images of one size are batched as one camera."""
    from lerobot_ki.text_generation import generate_text

    def generate(images: list[torch.Tensor], prompts: list[str]) -> list[str]:
        if len({tuple(i.shape) for i in images}) == 1:
            return generate_text(
                model, tokenizer, torch.stack(images), prompts, max_new_tokens=max_new_tokens
            )
        return [
            generate_text(model, tokenizer, i[None], [p], max_new_tokens=max_new_tokens)[0]
            for i, p in zip(images, prompts, strict=True)
        ]

    return generate


def max_answer_tokens(records: list[VQARecord], tokenizer) -> int:
    """Tokens the longest reference answer needs, plus one for EOS: enough to generate any right answer."""
    return 1 + max(len(tokenizer.encode_text(r.answer, bos=False)) for r in records)
