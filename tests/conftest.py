"""Shared fixtures of the end-to-end tests: one synthetic dataset and one `lerobot-train` run per session.

Everything runs offline: HF_HUB_OFFLINE=1 here (before huggingface_hub is imported by a test module) and in
every subprocess, whose HF_HOME is an empty folder so no cached Hub file can stand in for a missing one.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from synthetic_dataset import make_dataset

REPO_ID = "local/ki_synthetic"
CHUNK_SIZE = 10
N_ACTION_STEPS = 5
TRAIN_STEPS = 30
SAVE_FREQ = 15
LOG_FREQ = 5

# The tiny ki_vla of the README, sized for a 2-core CPU.
TINY_POLICY_ARGS = [
    "--policy.type=ki_vla",
    "--policy.paligemma_variant=tiny",
    "--policy.action_expert_variant=tiny",
    f"--policy.chunk_size={CHUNK_SIZE}",
    f"--policy.n_action_steps={N_ACTION_STEPS}",
    "--policy.image_resolution=[64,64]",
    "--policy.max_state_dim=8",
    "--policy.max_action_dim=8",
    "--policy.tokenizer_max_length=96",
    "--policy.device=cpu",
    "--policy.push_to_hub=false",
]

_LOG_STEP = re.compile(r"\bstep:(\d+)\b.*\bloss:")
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def venv_script(name: str) -> str:
    """A console script of the interpreter running the tests (the venv's bin/)."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def logged_steps(log: str) -> list[int]:
    """The `step:N` of each metrics line LeRobot's MetricsTracker logs."""
    return [int(m.group(1)) for m in _LOG_STEP.finditer(log)]


def logged_metric(log: str, name: str) -> list[float]:
    """Every value of `name:VALUE` in the metrics lines (`loss_flow:2.06` -> 2.06)."""
    values = []
    for line in log.splitlines():
        if _LOG_STEP.search(line):
            values += [float(v) for v in re.findall(rf"\b{re.escape(name)}:{_NUMBER}", line)]
    return values


def run_logged(cmd: list[str], env: dict[str, str], log_file: Path, timeout: float = 600) -> str:
    """Run `cmd`, write its merged stdout/stderr to `log_file`, fail the test (with the tail) on error.
    On a timeout the whole process group is killed (`accelerate launch` leaves its workers behind
    otherwise, and they would slow every later test) and what it printed so far is kept."""
    start = time.perf_counter()
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            log_file.write_text(out)
            pytest.fail(
                f"{' '.join(cmd[:6])} ... timed out after {timeout:.0f}s; log {log_file}:\n{out[-6000:]}"
            )
    log_file.write_text(out)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd[:6])} ... exited with {proc.returncode} after "
            f"{time.perf_counter() - start:.0f}s; log {log_file}:\n{out[-6000:]}"
        )
    return out


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory) -> dict[str, str]:
    """Environment of every subprocess: offline, an empty HF cache, no wandb."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        HF_LEROBOT_HOME=str(home / "lerobot"),
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "ki_synthetic"
    make_dataset(root, repo_id=REPO_ID)
    return root


def train_args(dataset_root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={dataset_root}",
        *TINY_POLICY_ARGS,
        f"--output_dir={output_dir}",
        "--num_workers=0",
        "--wandb.enable=false",
        *extra,
    ]


@dataclass
class TrainRun:
    output_dir: Path
    log: str
    seconds: float
    # `checkpoints/` right after the run (the resume test adds to it later): name -> resolved path.
    checkpoints_after_run: dict[str, Path]

    def checkpoint(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"{step:06d}"

    @property
    def last(self) -> Path:
        return self.checkpoint(TRAIN_STEPS)

    @property
    def pretrained(self) -> Path:
        return self.last / "pretrained_model"


@pytest.fixture(scope="session")
def train_run(tmp_path_factory, dataset_root, offline_env) -> TrainRun:
    """One `lerobot-train --policy.type=ki_vla` run (no plugin flag) shared by the whole session."""
    work = tmp_path_factory.mktemp("train")
    output_dir = work / "run"
    cmd = [
        venv_script("lerobot-train"),
        *train_args(
            dataset_root,
            output_dir,
            "--batch_size=4",
            f"--steps={TRAIN_STEPS}",
            f"--log_freq={LOG_FREQ}",
            f"--save_freq={SAVE_FREQ}",
            "--seed=1000",
        ),
    ]
    start = time.perf_counter()
    log = run_logged(cmd, offline_env, work / "train.log")
    seconds = time.perf_counter() - start
    listing = {p.name: p.resolve() for p in (output_dir / "checkpoints").iterdir()}
    return TrainRun(output_dir=output_dir, log=log, seconds=seconds, checkpoints_after_run=listing)


@pytest.fixture(scope="session")
def tiny_train_args():
    """`train_args(dataset_root, output_dir, *extra)`: the CLI arguments of a tiny ki_vla run."""
    return train_args
