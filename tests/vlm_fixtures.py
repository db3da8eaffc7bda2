"""Small VLM data sets made in the tests: "what colour is the shape?" over rendered images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOUR_NAMES = ("red", "green", "blue", "yellow")
COLOUR_RGB = np.array([[230, 30, 30], [30, 210, 40], [40, 60, 235], [235, 220, 30]], dtype=np.uint8)
PROMPT = "What colour is the shape?"


def render_shape(colour: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: a grey noisy background and a square or a disc of the given colour at a
    random place and size, so the answer depends on the colour only."""
    img = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
    side = int(rng.integers(size // 4, size // 2))
    y, x = rng.integers(0, size - side, size=2)
    if rng.random() < 0.5:
        img[y : y + side, x : x + side] = COLOUR_RGB[colour]
    else:
        yy, xx = np.mgrid[:size, :size]
        r = side / 2
        disc = (yy - y - r) ** 2 + (xx - x - r) ** 2 <= r**2
        img[disc] = COLOUR_RGB[colour]
    return img


def colour_records(n: int, seed: int, size: int = 32) -> list[dict]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, len(COLOUR_NAMES), size=n)
    return [
        {
            "image": Image.fromarray(render_shape(int(c), rng, size)),
            "prompt": PROMPT,
            "answer": COLOUR_NAMES[c],
        }
        for c in colours
    ]


def save_hf_dataset(path: Path, records: list[dict]) -> Path:
    """An on-disk `datasets` dataset (save_to_disk) with an Image column."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    columns = {k: [r[k] for r in records] for k in ("image", "prompt", "answer")}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return path


def save_jsonl_folder(path: Path, records: list[dict], lines_per_file: int = 50) -> Path:
    """*.jsonl files + PNGs; a record's "image" is written as a relative path."""
    (path / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(records):
        name = f"images/{i:05d}.png"
        r["image"].save(path / name)
        rows.append({"image": name, "prompt": r["prompt"], "answer": r["answer"]})
    for start in range(0, len(rows), lines_per_file):
        with (path / f"part_{start // lines_per_file:03d}.jsonl").open("w") as f:
            for row in rows[start : start + lines_per_file]:
                f.write(json.dumps(row) + "\n")
    return path
