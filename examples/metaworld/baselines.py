"""LeRobot's own policies as reference rows: what a user choosing a policy compares ki_vla with.

ACT and Diffusion Policy are trained by `lerobot-train` on the same demonstrations, steps, batch and seed
as ki_vla, with LeRobot's default hyper-parameters except:
- no downloaded ImageNet ResNet-18 weights (`pretrained_backbone_weights=null`): everything runs offline;
- ACT predicts and executes chunks of ki_vla's `chunk_size` / `n_action_steps`, so both replan as often;
- Diffusion Policy (changed 2026-12-08; measured on our 2-core CPU, batch 16, 96 px):
  - the 16-step horizon of Chi et al. (2023) instead of LeRobot 0.6.1's 64, executing ki_vla's
    `n_action_steps` of it (LeRobot: 32), so it replans as often as ki_vla and ACT;
    `drop_n_last_frames` follows by the formula LeRobot's config states (horizon - n_action_steps -
    n_obs_steps + 1);
  - a U-Net half as wide (down_dims 256/512/1024, 76M parameters; LeRobot's 512/1024/2048 has 263M), at
    1.07 s a training step instead of 4.9-5.4 s (8.5 s with the 64-step horizon): three seeds of the
    ablation fit a session, LeRobot's default would take ~50-85 min a seed;
  - warm-up over the first tenth of the run (the ablation's ki_vla schedule) instead of LeRobot's 500
    steps, which would keep a 600-step run at a fraction of its learning rate throughout;
  - 10 DDIM steps instead of 100 DDPM steps: 10x cheaper rollouts on a CPU.
Used by the main job (`main_job.py --baseline act`) and the ablation's reference arms.
"""

from __future__ import annotations

DIFFUSION_HORIZON = 16  # a multiple of 2 ** len(down_dims), as LeRobot's U-Net requires
DIFFUSION_OBS_STEPS = 2  # LeRobot's default n_obs_steps

REFERENCE_FLAGS: dict[str, tuple[str, ...]] = {
    "act": ("--policy.pretrained_backbone_weights=null",),
    "diffusion": (
        "--policy.pretrained_backbone_weights=null",
        "--policy.noise_scheduler_type=DDIM",
        "--policy.num_inference_steps=10",
        f"--policy.horizon={DIFFUSION_HORIZON}",
        "--policy.down_dims=[256,512,1024]",
    ),
}


def reference_policy_flags(policy_type: str, chunk_size: int, n_action_steps: int, steps: int) -> list[str]:
    """The `--policy.*` flags of `lerobot-train` for LeRobot's `policy_type` ("act" or "diffusion") in a run
    of `steps` training steps."""
    if policy_type not in REFERENCE_FLAGS:
        raise ValueError(f"no reference policy {policy_type!r}; choose from {', '.join(REFERENCE_FLAGS)}")
    flags = [f"--policy.type={policy_type}", *REFERENCE_FLAGS[policy_type]]
    if policy_type == "act":
        flags += [f"--policy.chunk_size={chunk_size}", f"--policy.n_action_steps={n_action_steps}"]
    else:
        drop = DIFFUSION_HORIZON - n_action_steps - DIFFUSION_OBS_STEPS + 1
        if drop < 0:
            raise ValueError(
                f"n_action_steps {n_action_steps} does not fit Diffusion Policy's {DIFFUSION_HORIZON}-step "
                f"horizon with {DIFFUSION_OBS_STEPS} observation steps: use at most "
                f"{DIFFUSION_HORIZON - DIFFUSION_OBS_STEPS + 1}."
            )
        flags += [
            f"--policy.n_action_steps={n_action_steps}",
            f"--policy.drop_n_last_frames={drop}",
            f"--policy.scheduler_warmup_steps={max(1, steps // 10)}",
        ]
    return flags
