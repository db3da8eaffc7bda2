"""Entry module LeRobot's `register_third_party_plugins()` imports (distribution `lerobot_policy_ki_vla`)."""

import lerobot_ki  # noqa: F401  (registers --policy.type=ki_vla)
