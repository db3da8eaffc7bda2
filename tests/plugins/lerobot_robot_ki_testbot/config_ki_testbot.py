"""`KITestBotConfig`: sizes of the simulated arm and the faults a test can inject."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.robots.config import RobotConfig


@RobotConfig.register_subclass("ki_testbot")
@dataclass(kw_only=True)
class KITestBotConfig(RobotConfig):
    # Commanded joints j0..j{n-1}, plus mimic joints that follow their mean and take no command (like a
    # gripper's second finger): the state has `joints + mimic_joints` dims, the action `joints`.
    joints: int = 3
    mimic_joints: int = 1
    # Fraction of the distance to the commanded target a motor covers per command (first-order lag).
    response: float = 0.5
    # Cameras (named so that the policy sees `observation.images.<name>`), square RGB frames.
    camera_names: list[str] = field(default_factory=lambda: ["top", "wrist"])
    image_size: int = 32
    # JSON lines of every command and observation, for the tests to read back.
    log_path: str | None = None

    # --- faults (index of the get_observation call, counted from 0; -1 = never) ---------------------
    late_frame_at: int = -1  # that frame arrives `late_frame_s` late
    late_frame_s: float = 0.5
    missing_frame_at: int = -1  # that frame never arrives: TimeoutError, as LeRobot's cameras raise
    nan_state_at: int = -1  # from that call on, joint 0 reads NaN (a broken encoder)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.joints < 1 or self.mimic_joints < 0:
            raise ValueError(f"need joints >= 1, mimic_joints >= 0; got {self.joints}, {self.mimic_joints}")
        if not 0 < self.response <= 1:
            raise ValueError(f"response must be in (0, 1], got {self.response}")
