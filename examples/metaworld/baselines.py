"""LeRobot's own policies as reference rows: what a user choosing a policy compares ki_vla with.

ACT and Diffusion Policy are trained by `lerobot-train` on the same demonstrations, steps, batch and seed
as ki_vla, with LeRobot's default hyper-parameters except:
- no downloaded ImageNet ResNet-18 weights (`pretrained_backbone_weights=null`): everything runs offline;
- ACT predicts and executes chunks of ki_vla's `chunk_size` / `n_action_steps`, so both replan as often;
- Diffusion samples with 10 DDIM steps instead of 100 DDPM steps: 10x cheaper rollouts on a CPU.
Used by the main job (`main_job.py --baseline act`) and the ablation's reference arms.
"""

from __future__ import annotations

REFERENCE_FLAGS: dict[str, tuple[str, ...]] = {
    "act": ("--policy.pretrained_backbone_weights=null",),
    "diffusion": (
        "--policy.pretrained_backbone_weights=null",
        "--policy.noise_scheduler_type=DDIM",
        "--policy.num_inference_steps=10",
    ),
}


def reference_policy_flags(policy_type: str, chunk_size: int, n_action_steps: int) -> list[str]:
    """The `--policy.*` flags of `lerobot-train` for LeRobot's `policy_type` ("act" or "diffusion")."""
    if policy_type not in REFERENCE_FLAGS:
        raise ValueError(f"no reference policy {policy_type!r}; choose from {', '.join(REFERENCE_FLAGS)}")
    flags = [f"--policy.type={policy_type}", *REFERENCE_FLAGS[policy_type]]
    if policy_type == "act":
        flags += [f"--policy.chunk_size={chunk_size}", f"--policy.n_action_steps={n_action_steps}"]
    return flags
