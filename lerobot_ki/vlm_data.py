"""VLM co-training data: where the examples come from and the stream the policy draws them from.

Sources (all lazy: a record is read and its images decoded only when the stream reaches it):

- a Hugging Face `datasets` dataset: a directory written by `save_to_disk` (memory-mapped), a Hub id
  (`load_dataset`, or with `vlm_streaming=true` an `IterableDataset` that downloads as it goes);
- a folder of `*.jsonl` files, one record per line, image paths relative to the folder.

The stream shards records by process (rank r of W reads its own part), shuffles them with a permutation
per epoch drawn from (seed, epoch), and keeps its position in a few integers the policy saves with the
checkpoint, so a resumed run continues exactly where it stopped. Bad records are skipped and counted.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_RECORDS_FOR_BAD_FRACTION = 100
SHUFFLE_BUFFER = 1000  # streaming: records held by the shuffle buffer of an IterableDataset


class BadVLMRecord(ValueError):  # noqa: N818 - a record, not an error of the program
    """A record that cannot be used; `reason` is the short category it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class VLMDataError(RuntimeError):
    """The VLM data as a whole is unusable (too many bad records, empty, misconfigured)."""


@dataclass
class VLMExample:
    images: list[Tensor]  # each (3, H, W) float32 in [0, 1], any size
    prompt: str
    answer: str


@dataclass
class VLMColumns:
    image: str = "image"
    prompt: str = "prompt"
    answer: str = "answer"


# --- records -> examples ----------------------------------------------------------------------------
def image_to_tensor(obj: Any, base_dir: Path | None = None) -> Tensor:
    """PIL image, HWC uint8 array, CHW tensor in [0, 1], a path, or `datasets`' {"bytes", "path"} dict ->
    (3, H, W) float32 in [0, 1]."""
    if isinstance(obj, Tensor):
        img = obj.float()
        if img.ndim != 3 or img.shape[0] != 3:
            raise BadVLMRecord("bad image", f"tensor of shape {tuple(img.shape)}, expected (3, H, W)")
        return img
    if isinstance(obj, dict):  # datasets.Image(decode=False)
        obj = obj.get("bytes") or obj.get("path")
    if isinstance(obj, bytes):
        obj = _open_image(io.BytesIO(obj), "<bytes>")
    elif isinstance(obj, (str, os.PathLike)):
        path = Path(obj) if base_dir is None or Path(obj).is_absolute() else base_dir / obj
        if not path.is_file():
            raise BadVLMRecord("image file not found", str(path))
        obj = _open_image(path, str(path))
    if isinstance(obj, Image.Image):
        obj = np.asarray(obj.convert("RGB"))
    if isinstance(obj, np.ndarray):
        if obj.ndim == 2:
            obj = np.repeat(obj[:, :, None], 3, axis=2)
        if obj.ndim != 3 or obj.shape[2] != 3:
            raise BadVLMRecord("bad image", f"array of shape {obj.shape}, expected (H, W, 3)")
        scale = 255.0 if obj.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(obj)).permute(2, 0, 1).float() / scale  # copied: writable
    raise BadVLMRecord("bad image", f"unsupported image value of type {type(obj).__name__}")


def _open_image(src, name: str) -> Image.Image:
    try:
        img = Image.open(src)
        img.load()  # decode now: a truncated or corrupt file fails here, not later in a batch
        return img
    except Exception as e:
        raise BadVLMRecord("unreadable image", f"{name} ({type(e).__name__}: {e})") from e


def parse_record(record: dict, columns: VLMColumns, base_dir: Path | None = None) -> VLMExample:
    """A raw record -> a checked example; raises `BadVLMRecord` for anything that cannot be trained on."""
    if not isinstance(record, dict):
        raise BadVLMRecord("not a record", f"got {type(record).__name__}")
    images = record.get(columns.image)
    if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
        raise BadVLMRecord("missing image", f"'{columns.image}' is absent or empty")
    if not isinstance(images, (list, tuple)):
        images = [images]
    if any(i is None for i in images):
        raise BadVLMRecord("missing image", f"an entry of '{columns.image}' is empty")
    prompt = record.get(columns.prompt, "")
    prompt = "" if prompt is None else prompt
    answer = record.get(columns.answer)
    if not isinstance(prompt, str):
        raise BadVLMRecord("bad prompt", f"'{columns.prompt}' is a {type(prompt).__name__}, not text")
    if not isinstance(answer, str) or not answer.strip():
        raise BadVLMRecord("empty answer", f"'{columns.answer}' is {answer!r}")
    return VLMExample([image_to_tensor(i, base_dir) for i in images], prompt, answer)


# --- sources ----------------------------------------------------------------------------------------
class JSONLSource:
    """Records from every `*.jsonl` under a folder (sorted paths, line order). Only the byte offset of
    each line is indexed up front; a line is read and parsed when the stream reaches it."""

    def __init__(self, folder: Path):
        self.base_dir = folder
        files = sorted(folder.rglob("*.jsonl"))
        if not files:
            raise VLMDataError(f"No *.jsonl file under {folder}.")
        self._lines: list[tuple[Path, int, int]] = []  # (file, byte offset, line number)
        for path in files:
            with path.open("rb") as f:
                offset = 0
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        self._lines.append((path, offset, lineno))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict:
        path, offset, lineno = self._lines[index]
        try:
            with path.open("rb") as f:
                f.seek(offset)
                return json.loads(f.readline())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadVLMRecord("unreadable record", f"{path.name}:{lineno} ({type(e).__name__})") from e


def open_vlm_source(
    name: str,
    image_column: str = "image",
    config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
):
    """(source, base_dir). The source is map-style (`len`, `[i]`) or a `datasets.IterableDataset`."""
    import datasets

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise VLMDataError(f"{path} has splits {list(ds)}, not '{split}' (--policy.vlm_split).")
                ds = ds[split]
            ds = _undecoded_images(ds, image_column)
            return (ds.to_iterable_dataset() if streaming else ds), path
        if any(path.rglob("*.jsonl")):
            return JSONLSource(path), path
        raise VLMDataError(
            f"{path} is neither a `datasets` directory (save_to_disk) nor a folder of *.jsonl files."
        )
    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=streaming)
    except Exception as e:
        raise VLMDataError(
            f"Could not load the VLM dataset {name!r} ({type(e).__name__}: {e}). Pass a local directory "
            f"(save_to_disk or *.jsonl + images) or a reachable Hub id. "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}"
        ) from e
    return _undecoded_images(ds, image_column), None


def _undecoded_images(ds, column: str):
    """Images stay bytes until the stream decodes them, so a corrupt one is a counted bad record rather
    than an exception deep inside `datasets`' iteration."""
    import datasets

    feature = (ds.features or {}).get(column)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.List) and isinstance(inner, datasets.Image):
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed once initialised (Accelerate does it before
    the first step), else the launcher's RANK / WORLD_SIZE, else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --- the stream -------------------------------------------------------------------------------------
@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0  # records of this epoch already read by this process
    records_read: int = 0
    records_bad: int = 0


class VLMStream:
    """This process's endless, shuffled, resumable sequence of good examples.

    Map-style sources: epoch e is the permutation `randperm(N, seed + e)`; process r of W reads its
    positions r, r + W, ... (N // W of them, so every process has as many records per epoch and the
    shards of an epoch are disjoint). Iterable sources: `split_dataset_by_node`, a buffered shuffle
    reseeded per epoch (`set_epoch`), and a resume that skips the records already read in the epoch.
    """

    def __init__(
        self,
        source,
        prepare: Callable[[dict], Any],  # raw record -> example; raises BadVLMRecord
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float = 0.1,
        position: StreamPosition | None = None,
    ):
        self.source = source
        self.prepare = prepare
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.max_bad_fraction = max_bad_fraction
        self.pos = position or StreamPosition()
        self.bad_reasons: Counter[str] = Counter()
        self._perm: tuple[int, Tensor] | None = None  # (epoch, permutation)
        self._iter: Iterator | None = None
        self._map_style = hasattr(source, "__getitem__") and hasattr(source, "__len__")
        if self._map_style and len(source) // world_size == 0:
            raise VLMDataError(
                f"The VLM dataset has {len(source)} records, fewer than {world_size} processes."
            )
        if not self._map_style:
            from datasets.distributed import split_dataset_by_node

            shard = split_dataset_by_node(source, rank=rank, world_size=world_size)
            self._shuffled = shard.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)

    def take(self, n: int) -> list:
        return [self.next() for _ in range(n)]

    def next(self):
        while True:
            self.pos.records_read += 1
            try:
                return self.prepare(self._next_record())
            except BadVLMRecord as e:
                self._count_bad(e)

    # --- positions ------------------------------------------------------------------------------------
    def _next_record(self) -> dict:
        if self._map_style:
            per_rank = len(self.source) // self.world_size
            if self.pos.index >= per_rank:
                self.pos.epoch, self.pos.index = self.pos.epoch + 1, 0
            if self._perm is None or self._perm[0] != self.pos.epoch:
                gen = torch.Generator().manual_seed(self.seed + self.pos.epoch)
                self._perm = (self.pos.epoch, torch.randperm(len(self.source), generator=gen))
            index = int(self._perm[1][self.rank + self.pos.index * self.world_size])
            self.pos.index += 1
            try:
                return self.source[index]
            except BadVLMRecord:
                raise
            except Exception as e:  # e.g. an image column whose bytes do not decode
                raise BadVLMRecord("unreadable record", f"record {index} ({type(e).__name__}: {e})") from e
        for _ in range(2):  # at most one epoch boundary per record
            if self._iter is None:
                self._shuffled.set_epoch(self.pos.epoch)
                # Resume: read past the records this epoch already gave (IterableDataset.skip would
                # change the shard order of a shuffled dataset, so the sequence would differ).
                self._iter = itertools.islice(iter(self._shuffled), self.pos.index, None)
            try:
                record = next(self._iter)
                self.pos.index += 1
                return record
            except StopIteration:
                self._iter = None
                self.pos.epoch, self.pos.index = self.pos.epoch + 1, 0
        raise VLMDataError("The VLM dataset shard of this process is empty.")

    # --- bad records ----------------------------------------------------------------------------------
    def _count_bad(self, err: BadVLMRecord) -> None:
        self.pos.records_bad += 1
        self.bad_reasons[err.reason] += 1
        if self.bad_reasons[err.reason] <= 5 or self.pos.records_bad % 100 == 0:
            logger.warning(
                "VLM record skipped: %s (%d of %d records read were bad so far)",
                err,
                self.pos.records_bad,
                self.pos.records_read,
            )
        allowed = self.max_bad_fraction * max(self.pos.records_read, MIN_RECORDS_FOR_BAD_FRACTION)
        if self.pos.records_bad > allowed:
            raise VLMDataError(
                f"{self.pos.records_bad} of {self.pos.records_read} VLM records read were bad "
                f"({dict(self.bad_reasons)}; last: {err}), more than vlm_max_bad_fraction="
                f"{self.max_bad_fraction}. Fix the data, or raise --policy.vlm_max_bad_fraction."
            ) from err
