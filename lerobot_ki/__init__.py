"""lerobot_ki: knowledge-insulated VLA policy (`--policy.type=ki_vla`) for LeRobot.

Importing the package registers the `ki_vla` config with LeRobot; the policy class and processors are
found by LeRobot's naming convention (`modeling_ki.KIPolicy`, `processor_ki.make_ki_vla_pre_post_processors`).
"""

# The processor steps must be registered before a saved pipeline that names them is loaded.
from lerobot_ki import processor_ki  # noqa: E402, F401
from lerobot_ki.configuration_ki import KIConfig

__all__ = ["KIConfig"]
