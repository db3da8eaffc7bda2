"""The VLM data stream: sources, per-process shards, per-epoch shuffling, exact resume, bad records."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image
from vlm_fixtures import PROMPT, colour_records, save_hf_dataset, save_jsonl_folder

from lerobot_ki.vlm_data import (
    StreamPosition,
    VLMColumns,
    VLMDataError,
    VLMStream,
    open_vlm_source,
    parse_record,
)


def _ids(n: int) -> list[dict]:
    return [{"id": i} for i in range(n)]


def _take_ids(stream: VLMStream, n: int) -> list[int]:
    return [r["id"] for r in stream.take(n)]


def _identity(record: dict) -> dict:
    return record


# --- order: shards, epochs, resume -------------------------------------------------------------------
def test_map_stream_shards_are_disjoint_and_each_epoch_is_a_new_permutation():
    n, world = 23, 2
    per_rank = n // world
    streams = [VLMStream(_ids(n), _identity, seed=7, rank=r, world_size=world) for r in range(world)]
    epochs = [_take_ids(s, 3 * per_rank) for s in streams]
    for e in range(3):
        parts = [ids[e * per_rank : (e + 1) * per_rank] for ids in epochs]
        assert len(set(parts[0])) == per_rank and len(set(parts[1])) == per_rank  # no repeat in an epoch
        assert not set(parts[0]) & set(parts[1]), "two processes read the same record in one epoch"
    assert epochs[0][:per_rank] != epochs[0][per_rank : 2 * per_rank]  # reshuffled per epoch
    assert streams[0].pos.epoch == 2
    # The order is a function of the seed.
    assert _take_ids(VLMStream(_ids(n), _identity, seed=7), 10) == _take_ids(
        VLMStream(_ids(n), _identity, seed=7), 10
    )
    assert _take_ids(VLMStream(_ids(n), _identity, seed=7), 10) != _take_ids(
        VLMStream(_ids(n), _identity, seed=8), 10
    )


def _iterable(n: int) -> datasets.IterableDataset:
    return datasets.Dataset.from_dict({"id": list(range(n))}).to_iterable_dataset(num_shards=4)


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_a_restored_position_continues_the_same_order(kind):
    def source():
        return _ids(17) if kind == "map" else _iterable(17)

    uninterrupted = _take_ids(VLMStream(source(), _identity, seed=3), 45)  # crosses two epoch ends
    first = VLMStream(source(), _identity, seed=3)
    head = _take_ids(first, 20)
    saved = StreamPosition(**vars(first.pos))
    resumed = VLMStream(source(), _identity, seed=3, position=saved)
    assert head + _take_ids(resumed, 25) == uninterrupted
    if kind == "iterable":  # one epoch of an iterable source holds each record once
        assert sorted(uninterrupted[:17]) == list(range(17))


def test_iterable_shards_are_disjoint():
    shards = [_take_ids(VLMStream(_iterable(16), _identity, rank=r, world_size=2), 8) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(16))


# --- sources -----------------------------------------------------------------------------------------
def test_hf_and_jsonl_sources_give_the_same_examples(tmp_path):
    records = colour_records(6, seed=0, size=16)
    hf, _ = open_vlm_source(str(save_hf_dataset(tmp_path / "hf", records)))
    jsonl, base = open_vlm_source(str(save_jsonl_folder(tmp_path / "jsonl", records, lines_per_file=4)))
    assert len(hf) == len(jsonl) == 6
    assert len(list((tmp_path / "jsonl").glob("*.jsonl"))) == 2
    for i in range(6):
        a = parse_record(hf[i], VLMColumns())
        b = parse_record(jsonl[i], VLMColumns(), base)
        assert (a.prompt, a.answer) == (b.prompt, b.answer) == (PROMPT, records[i]["answer"])
        assert a.images[0].shape == (3, 16, 16) and a.images[0].min() >= 0.0 and a.images[0].max() <= 1.0
        assert a.images[0].equal(b.images[0])  # PNG is lossless: the same pixels either way


def test_source_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VLMDataError, match="neither a `datasets` directory"):
        open_vlm_source(str(tmp_path / "empty"))
    with pytest.raises(VLMDataError, match="HF_HUB_OFFLINE=1"):
        open_vlm_source("nobody/no_such_vlm_dataset")
    with pytest.raises(VLMDataError, match="3 records, fewer than 4 processes"):
        VLMStream(_ids(3), _identity, world_size=4)


# --- bad records -------------------------------------------------------------------------------------
def _jsonl_with_bad_records(root):
    good = colour_records(4, seed=1, size=16)
    save_jsonl_folder(root, good)
    (root / "images" / "corrupt.png").write_bytes(b"this is not a png")
    Image.new("RGB", (16, 16)).save(root / "images" / "ok.png")
    bad_lines = [
        json.dumps({"prompt": PROMPT, "answer": "red"}),  # no image
        json.dumps({"image": "images/missing.png", "prompt": PROMPT, "answer": "red"}),
        json.dumps({"image": "images/ok.png", "prompt": PROMPT, "answer": "  "}),  # empty answer
        json.dumps({"image": "images/corrupt.png", "prompt": PROMPT, "answer": "red"}),
        '{"image": "images/ok.png", "prompt": ',  # truncated line
    ]
    (root / "zz_bad.jsonl").write_text("\n".join(bad_lines) + "\n")
    return good


def test_bad_jsonl_records_are_skipped_and_counted(tmp_path, caplog):
    good = _jsonl_with_bad_records(tmp_path)
    source, base = open_vlm_source(str(tmp_path))
    stream = VLMStream(source, lambda r: parse_record(r, VLMColumns(), base), max_bad_fraction=0.1)
    examples = stream.take(2 * len(good))  # two epochs of 4 good and 5 bad records each
    assert sorted(e.answer for e in examples) == sorted(2 * [r["answer"] for r in good])
    # Every bad record of the first epoch was met (the second epoch may stop before its last ones).
    assert 5 <= stream.pos.records_bad == stream.pos.records_read - 8 <= 10
    assert set(stream.bad_reasons) == {
        "missing image",
        "image file not found",
        "empty answer",
        "unreadable image",
        "unreadable record",
    }
    assert "VLM record skipped" in caplog.text and "zz_bad.jsonl:5" in caplog.text


def test_too_many_bad_records_stop_with_a_clear_error(tmp_path):
    _jsonl_with_bad_records(tmp_path)
    source, base = open_vlm_source(str(tmp_path))
    strict = VLMStream(source, lambda r: parse_record(r, VLMColumns(), base), max_bad_fraction=0.0)
    with pytest.raises(VLMDataError, match="vlm_max_bad_fraction=0.0"):
        strict.take(9)
    # A source with nothing usable never loops forever: it stops once the bad count passes the limit.
    all_bad = [{"image": None, "prompt": "p", "answer": "a"}] * 5
    stream = VLMStream(all_bad, lambda r: parse_record(r, VLMColumns()), max_bad_fraction=0.1)
    with pytest.raises(VLMDataError, match=r"11 of 11 VLM records read were bad \(\{'missing image': 11\}"):
        stream.take(1)


def test_bad_hf_records_are_skipped_and_counted(tmp_path):
    records = colour_records(3, seed=2, size=16)
    features = datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    rows = {
        "image": [records[0]["image"], None, records[1]["image"], {"bytes": b"garbage", "path": None}],
        "prompt": [PROMPT, PROMPT, PROMPT, PROMPT],
        "answer": [records[0]["answer"], "red", "", "blue"],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    source, _ = open_vlm_source(str(tmp_path / "hf"))
    stream = VLMStream(source, lambda r: parse_record(r, VLMColumns()), max_bad_fraction=1.0)
    assert [e.answer for e in stream.take(3)] == [records[0]["answer"]] * 3
    # Three epochs (shuffled): the first two were read to the end.
    assert set(stream.bad_reasons) == {"missing image", "empty answer", "unreadable image"}
    assert all(2 <= n <= 3 for n in stream.bad_reasons.values()), stream.bad_reasons
