"""Make this folder discoverable by LeRobot in a child process, without installing anything.

LeRobot 0.6.1's register_third_party_plugins() imports every *distribution* (importlib.metadata) whose name
starts with `lerobot_robot_`; a module on sys.path alone is not enough. A minimal dist-info folder on
PYTHONPATH makes the plugin folder such a distribution.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "lerobot_robot_ki_testbot"
PLUGINS_DIR = Path(__file__).resolve().parent.parent


def discoverable_env(base_env: dict[str, str], dist_dir: Path) -> dict[str, str]:
    """`base_env` plus a PYTHONPATH under which `lerobot-*` finds and imports this robot plugin."""
    info = Path(dist_dir) / f"{NAME}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0.1\n")
    env = dict(base_env)
    paths = [str(PLUGINS_DIR), str(dist_dir), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env
