"""A simulated robot for the rollout tests, discovered by LeRobot as a third-party plugin.

LeRobot imports every installed distribution named `lerobot_robot_*` (register_third_party_plugins); the
tests make this folder such a distribution for their subprocesses (a dist-info on PYTHONPATH), so
`lerobot-rollout --robot.type=ki_testbot` runs the real CLI against it.
"""

from .config_ki_testbot import KITestBotConfig
from .ki_testbot import KITestBot

__all__ = ["KITestBot", "KITestBotConfig"]
