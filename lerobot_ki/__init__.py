"""lerobot_ki: knowledge-insulated VLA policy (`--policy.type=ki_vla`) for LeRobot.

Importing the package registers the `ki_vla` config with LeRobot (so `make_policy_config("ki_vla", ...)`
works after `import lerobot_ki`); the policy class and processors are found by LeRobot's naming convention
(`modeling_ki.KIPolicy`, `processor_ki.make_ki_vla_pre_post_processors`). `KIPolicy` is also importable
from here; it is loaded on first use, so registering the plugin does not import the model code.
"""

from typing import TYPE_CHECKING

# The processor steps must be registered before a saved pipeline that names them is loaded.
from lerobot_ki import log_filters, processor_ki  # noqa: F401
from lerobot_ki.configuration_ki import KIConfig

if TYPE_CHECKING:
    from lerobot_ki.modeling_ki import KIPolicy

log_filters.shorten_torchcodec_warning()

__all__ = ["KIConfig", "KIPolicy"]


def __getattr__(name: str):
    if name == "KIPolicy":
        from lerobot_ki.modeling_ki import KIPolicy

        return KIPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
