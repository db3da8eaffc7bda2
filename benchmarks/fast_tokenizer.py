"""FAST vs naive per-dimension binning on a real LeRobot dataset: tokens per chunk, reconstruction error,
encode/decode throughput (medians of repeats). Not a test: it prints a markdown table.

    python benchmarks/fast_tokenizer.py --dataset.repo_id=local/metaworld_main_job \
        --dataset.root=outputs/main_job/dataset --chunk_size=20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.fast_artifacts import load_action_chunks

BINS = 256


def naive_binning(chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pi0-style discretisation: every step of every dim is one of 256 bins over [-1, 1]."""
    edges = np.linspace(-1, 1, BINS + 1)
    ids = np.clip(np.digitize(chunks, edges) - 1, 0, BINS - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    return ids.reshape(len(chunks), -1), centers[ids]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset.repo_id", dest="repo_id", required=True)
    p.add_argument("--dataset.root", dest="root", default=None)
    p.add_argument("--chunk_size", type=int, default=20)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--max_chunks", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    raw = load_action_chunks(args.repo_id, args.root, args.chunk_size, args.max_chunks)
    # Min/max normalisation to [-1, 1] per dim (what the main job uses for Meta-World).
    lo, hi = raw.reshape(-1, raw.shape[-1]).min(0), raw.reshape(-1, raw.shape[-1]).max(0)
    chunks = 2 * (raw - lo) / np.where(hi > lo, hi - lo, 1.0) - 1
    # Fit on even-indexed chunks, measure on the odd ones (held out).
    fit_set, test_set = chunks[::2], chunks[1::2]
    tok = FASTTokenizer.fit(fit_set, vocab_size=args.vocab_size, scale=args.scale)
    ids = tok.encode(test_set)
    recon = tok.decode(ids)
    n_tokens = np.array([len(r) for r in ids])
    bin_ids, bin_recon = naive_binning(test_set)

    enc_s = _median_time(lambda: tok.encode(test_set), args.repeats)
    dec_s = _median_time(lambda: tok.decode(ids), args.repeats)
    bin_s = _median_time(lambda: naive_binning(test_set), args.repeats)

    n = len(test_set)
    print(
        f"dataset {args.repo_id}: {len(chunks)} chunks of {args.chunk_size} x {chunks.shape[-1]} "
        f"(fit on {len(fit_set)}, measured on {n} held out); FAST vocab {tok.vocab_size}, scale {args.scale}"
    )
    print()
    print(
        "| tokenizer | tokens/chunk mean | p99 | max | recon MAE | recon max abs "
        "| encode chunks/s | decode chunks/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| FAST (DCT + BPE) | {n_tokens.mean():.1f} | {np.percentile(n_tokens, 99):.0f} | {n_tokens.max()} "
        f"| {np.abs(recon - test_set).mean():.4f} | {np.abs(recon - test_set).max():.4f} "
        f"| {n / enc_s:,.0f} | {n / dec_s:,.0f} |"
    )
    print(f"| naive 256-bin per dim | {bin_ids.shape[1]} | {bin_ids.shape[1]} | {bin_ids.shape[1]} "
          f"| {np.abs(bin_recon - test_set).mean():.4f} | {np.abs(bin_recon - test_set).max():.4f} "
          f"| {n / bin_s:,.0f} | - |")  # fmt: skip


if __name__ == "__main__":
    main()
