"""`lerobot-ki-fit-fast`: fits from a LeRobot dataset, prints statistics, never overwrites its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic_dataset import make_dataset
from tiny_setup import tiny_config

from lerobot_ki.fast import FASTTokenizer
from lerobot_ki.fast_artifacts import fit_fast_on_dataset

CLI = str(Path(sys.executable).parent / "lerobot-ki-fit-fast")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_fits_like_training_and_protects_existing_output(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "ds"
    make_dataset(root, episodes=4, length=15)
    out = tmp_path / "fast"
    args = [
        "--dataset.repo_id=local/ki_synthetic", f"--dataset.root={root}", "--chunk_size=10",
        "--vocab_size=256", f"--output_dir={out}",
    ]  # fmt: skip
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mean_tokens" in proc.stdout and "recon_mae" in proc.stdout
    cli_tok = FASTTokenizer.from_pretrained(out)
    assert (cli_tok.chunk_size, cli_tok.action_dim) == (10, 3)

    # Same chunks, same normalisation, same tokenizer as the automatic fit inside lerobot-train.
    cfg = tiny_config(fast_vocab_size=256)
    stats = LeRobotDataset("local/ki_synthetic", root=root).meta.stats
    auto_tok, _ = fit_fast_on_dataset("local/ki_synthetic", root, cfg, stats)
    probe = np.random.default_rng(0).uniform(-1, 1, (5, 10, 3))
    assert cli_tok.encode(probe) == auto_tok.encode(probe)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _run(*args[:-2], "--vocab_size=128", f"--output_dir={out}")
    assert again.returncode != 0 and "--overwrite=true" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_needs_a_dataset():
    proc = _run("--chunk_size=10")
    assert proc.returncode != 0 and "--dataset.repo_id" in proc.stderr


def test_help_lists_each_option_once_with_its_default(capsys):
    from lerobot_ki.cli.fit_fast import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count("  --dataset str") == 1
    assert "(default: 50)" in text and "(default: 1024)" in text and "(default: QUANTILES)" in text
    assert "--dataset.repo_id str" in text and "--dataset.root=/data/my_dataset \\\n" in text  # usage example
