"""Running the real `lerobot-rollout` CLI against the tests' simulated robot (tests/plugins/), and reading
back what the robot received and what was recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import venv_script
from synthetic_dataset import TASKS

sys.path.insert(0, str(Path(__file__).parent / "plugins"))  # the test robot, for its discovery helper
from lerobot_robot_ki_testbot.discovery import discoverable_env  # noqa: E402

FPS = 10  # the synthetic dataset's rate, so the policy's chunks are in its time base
TASK = TASKS[0]


def plugin_env(base_env: dict[str, str], dist_dir: Path) -> dict[str, str]:
    """`base_env` in which `lerobot-rollout --robot.type=ki_testbot` finds the test robot (see
    plugins/lerobot_robot_ki_testbot/discovery.py: LeRobot discovers plugins by distribution name)."""
    env = discoverable_env(base_env, dist_dir)
    # One intra-op thread: on a small shared CPU, torch's OpenMP workers next to the video encoder's and
    # RTC's threads stall a control tick for seconds (measured: 9 s); with one thread it holds 10 Hz.
    env["OMP_NUM_THREADS"] = "1"
    # Keyboard input through the terminal (pynput needs an X display): the highlight test types into it.
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(var, None)
    return env


def rollout_cmd(policy_path: Path, out: Path, *extra: str, duration: float = 4.0) -> list[str]:
    """A recording rollout of the tiny checkpoint on the test robot, logging the robot to out/robot.jsonl."""
    return [
        venv_script("lerobot-rollout"),
        f"--policy.path={policy_path}",
        "--robot.type=ki_testbot",
        f"--robot.log_path={out / 'robot.jsonl'}",
        "--dataset.repo_id=local/rollout_ki_testbot",
        f"--dataset.root={out / 'dataset'}",
        f"--dataset.single_task={TASK}",
        f"--dataset.fps={FPS}",
        "--dataset.push_to_hub=false",
        "--dataset.no_stamp=true",
        f"--fps={FPS}",
        f"--duration={duration}",
        "--device=cpu",
        "--play_sounds=false",
        *extra,
    ]


@dataclass
class RolloutRun:
    out: Path
    returncode: int
    log: str
    seconds: float

    @property
    def events(self) -> list[dict]:
        path = self.out / "robot.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def commands(self, before: float = float("inf")) -> np.ndarray:
        """(N, 3) commands the robot received before monotonic time `before`."""
        return np.array([e["command"] for e in self.of("action") if e["t"] < before]).reshape(-1, 3)

    def command_times(self, before: float = float("inf")) -> np.ndarray:
        return np.array([e["t"] for e in self.of("action") if e["t"] < before])

    def tail(self, n: int = 4000) -> str:
        return f"exit {self.returncode} after {self.seconds:.0f}s; log tail:\n{self.log[-n:]}"


def run_rollout(
    cmd: list[str],
    env: dict[str, str],
    out: Path,
    timeout: float = 120,
    while_running: Callable[[subprocess.Popen, Path], None] | None = None,
    stdin=subprocess.DEVNULL,
) -> RolloutRun:
    """Run `cmd` to its end; `while_running(proc, robot_log)` may act on it meanwhile (keys, signals)."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "rollout.log"
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=stdin)
        try:
            if while_running is not None:
                while_running(proc, out / "robot.jsonl")
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return RolloutRun(out, proc.returncode, log_file.read_text(), time.perf_counter() - start)


def wait_for_actions(robot_log: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until the robot has received `n` commands (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if robot_log.exists() and robot_log.read_text().count('"event": "action"') >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the robot did not receive {n} commands (process exit {proc.poll()})")


def jumps(commands: np.ndarray) -> np.ndarray:
    """(N-1,) largest change of any joint's command between consecutive control ticks."""
    return np.abs(np.diff(commands, axis=0)).max(axis=1)


def load_recording(out: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset("local/rollout_ki_testbot", root=out / "dataset")
