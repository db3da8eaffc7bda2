"""`KITestBot`: motors that move toward the commanded targets, cameras that draw the joint state.

No hardware: the state lives in this object. Every command and observation is appended to
`config.log_path` (JSON lines) so a test can check the rate and smoothness of what the robot received.
"""

from __future__ import annotations

import json
import math
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import IO

import numpy as np
from lerobot.robots.robot import Robot

from .config_ki_testbot import KITestBotConfig

JOINT_LIMIT = 2.0  # |position| the simulated motors can reach
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 80, 220]], dtype=np.uint8)


class KITestBot(Robot):
    config_class = KITestBotConfig
    name = "ki_testbot"

    def __init__(self, config: KITestBotConfig):
        super().__init__(config)
        self.config = config
        self._pos = np.zeros(config.joints + config.mimic_joints, dtype=np.float64)
        self._connected = False
        self._n_obs = 0
        self._log: IO[str] | None = None
        self._lock = threading.Lock()  # the RTC engine and the control loop run in different threads

    # --- features -----------------------------------------------------------------------------------
    @property
    def commanded(self) -> list[str]:
        return [f"j{i}.pos" for i in range(self.config.joints)]

    @property
    def mimic(self) -> list[str]:
        n = self.config.joints
        return [f"j{n + i}.pos" for i in range(self.config.mimic_joints)]

    @cached_property
    def cameras(self) -> dict[str, tuple[int, int, int]]:
        size = self.config.image_size
        return {name: (size, size, 3) for name in self.config.camera_names}

    @property
    def observation_features(self) -> dict:
        return {**{k: float for k in self.commanded + self.mimic}, **self.cameras}

    @property
    def action_features(self) -> dict:
        return {k: float for k in self.commanded}

    # --- lifecycle ----------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise RuntimeError(f"{self} is already connected")
        if self.config.log_path:
            Path(self.config.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.config.log_path, "a")  # noqa: SIM115  (closed in disconnect)
        self._connected = True
        self._write("connect", pos=self._pos.tolist())

    def disconnect(self) -> None:
        if not self._connected:
            raise RuntimeError(f"{self} is not connected")
        self._write("disconnect", pos=self._pos.tolist())
        self._connected = False
        if self._log is not None:
            self._log.close()
            self._log = None

    # --- I/O ----------------------------------------------------------------------------------------
    def get_observation(self) -> dict:
        self._require_connection()
        cfg = self.config
        with self._lock:
            i = self._n_obs
            self._n_obs += 1
            pos = self._pos.copy()
        if i == cfg.missing_frame_at:
            self._write("missing_frame", i=i)
            raise TimeoutError(f"{self}: camera '{cfg.camera_names[0]}' delivered no frame (frame {i})")
        if i == cfg.late_frame_at:
            self._write("late_frame", i=i, delay=cfg.late_frame_s)
            time.sleep(cfg.late_frame_s)
        if 0 <= cfg.nan_state_at <= i:
            pos[0] = math.nan
        obs: dict = {k: float(v) for k, v in zip(self.commanded + self.mimic, pos, strict=True)}
        for c, name in enumerate(cfg.camera_names):
            obs[name] = self._render(pos, c)
        self._write("obs", i=i)
        return obs

    def send_action(self, action: dict) -> dict:
        self._require_connection()
        unknown = set(action) - set(self.commanded) - set(self.mimic)
        missing = set(self.commanded) - set(action)
        if unknown or missing:
            raise ValueError(f"{self}: action keys unknown {sorted(unknown)}, missing {sorted(missing)}")
        command = np.array([float(action[k]) for k in self.commanded])
        if not np.isfinite(command).all():
            raise ValueError(f"{self}: refusing a non-finite command {command.tolist()}")
        target = command.clip(-JOINT_LIMIT, JOINT_LIMIT)
        n = self.config.joints
        with self._lock:
            # Mimic joints are not actuated (a command for them, e.g. LeRobot's return-to-start, is
            # ignored): they follow the mean of the commanded joints.
            self._pos[:n] += self.config.response * (target - self._pos[:n])
            self._pos[n:] = self._pos[:n].mean()
            pos = self._pos.tolist()
        self._write("action", command=command.tolist(), target=target.tolist(), pos=pos)
        return dict(zip(self.commanded, target.tolist(), strict=True))

    # --- helpers ------------------------------------------------------------------------------------
    def _render(self, pos: np.ndarray, camera: int) -> np.ndarray:
        """An 8x8 square whose place follows two joints (NaN reads draw it at the centre)."""
        size = self.config.image_size
        img = np.full((size, size, 3), 30, dtype=np.uint8)
        a, b = np.nan_to_num(pos[[camera % len(pos), (camera + 1) % len(pos)]])
        x = int(np.clip((a / JOINT_LIMIT + 1) / 2, 0, 1) * (size - 8))
        y = int(np.clip((b / JOINT_LIMIT + 1) / 2, 0, 1) * (size - 8))
        img[y : y + 8, x : x + 8] = COLOURS[camera % len(COLOURS)]
        return img

    def _require_connection(self) -> None:
        if not self._connected:
            raise ConnectionError(f"{self} is not connected")

    def _write(self, event: str, **fields) -> None:
        if self._log is None:
            return
        with self._lock:
            self._log.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
            self._log.flush()
