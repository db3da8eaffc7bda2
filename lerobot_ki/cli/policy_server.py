r"""`lerobot-ki-policy-server`: LeRobot's async-inference PolicyServer (gRPC), able to serve ki_vla.

    lerobot-ki-policy-server --host=0.0.0.0 --port=8080 --fps=30 --inference_latency=0.033

The flags are those of `python -m lerobot.async_inference.policy_server` (the same PolicyServerConfig, parsed
by draccus), and the robot side is LeRobot's own `python -m lerobot.async_inference.robot_client` with
`--policy_type=ki_vla`. LeRobot's server cannot serve ki_vla as it is: it checks the client's policy_type
against a fixed list (`SUPPORTED_POLICIES` in lerobot/async_inference/constants.py) and imports no
third-party policy plugin. This entry point imports the plugin (registering the `ki_vla` config, which
LeRobot's get_policy_class resolves to KIPolicy and whose saved processor steps the server then loads),
adds "ki_vla" to that list, and starts LeRobot's server unchanged.
"""

from __future__ import annotations

import draccus

import lerobot_ki  # noqa: F401  (registers the ki_vla config and processor steps with LeRobot)

try:
    from lerobot.async_inference import constants, policy_server
    from lerobot.async_inference.configs import PolicyServerConfig
except ModuleNotFoundError as e:  # grpcio comes with LeRobot's `async` extra, not with the base install
    if e.name != "grpc":
        raise
    raise ModuleNotFoundError(
        "LeRobot's async inference needs grpcio: pip install 'lerobot_policy_ki_vla[async]' "
        "(or 'lerobot[async]')"
    ) from e

POLICY_TYPE = "ki_vla"  # the name configuration_ki.py registers KIConfig under


def allow_ki_vla() -> None:
    """Add ki_vla to the server's allow-list, in place: policy_server.py did `from .constants import
    SUPPORTED_POLICIES`, so it holds the same list object and reads it on every SendPolicyInstructions;
    rebinding the name in either module would leave the other's copy unchanged."""
    if policy_server.SUPPORTED_POLICIES is not constants.SUPPORTED_POLICIES:
        raise RuntimeError("LeRobot's policy_server no longer shares constants.SUPPORTED_POLICIES")
    if POLICY_TYPE not in constants.SUPPORTED_POLICIES:
        constants.SUPPORTED_POLICIES.append(POLICY_TYPE)


def main(argv: list[str] | None = None) -> None:
    """Parse LeRobot's PolicyServerConfig from `argv` (None: the command line) and serve until stopped."""
    allow_ki_vla()
    cfg = draccus.parse(config_class=PolicyServerConfig, args=argv)
    policy_server.serve(cfg)


if __name__ == "__main__":
    main()
