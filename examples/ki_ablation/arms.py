"""The arms of the knowledge-insulation ablation: what each trains, as `lerobot-train` flags.

Every ki_vla arm shares the model size, data, FAST tokenizer, steps, learning rate and seeds; an arm
differs from KI only in the flags listed here. The paper's arms (Driess et al. 2025, arXiv 2505.23705):

- ki              stop-gradient + FAST CE + VLM co-training: the recipe.
- ki_no_cotrain   the same without VLM co-training data.
- joint           stop_gradient=false (the flow loss reaches the backbone: pi0.5 without insulation),
                  with co-training.
- pi0             fast_loss_weight=0, stop_gradient=false, no co-training: flow-only training of the
                  whole model, as pi0 fine-tuning does.
- frozen          train_expert_only: the backbone never changes (the paper reports it fails).
- naive_tokens    KI with 256-bin per-dimension tokens (RT-2/OpenVLA) instead of FAST.
- scratch         KI from a randomly initialised backbone: what the pretrained VLM contributes.

Diagnostic arms (not the paper's; run only when named with --arms):

- joint_no_cotrain  stop_gradient=false, FAST CE, no co-training: pi0 plus the FAST CE, joint minus the
                    co-training; between `pi0` and `joint` it tells which of the two keeps joint training
                    from following the push / pick-place instructions (language_probe.py).

Reference rows (not ablations): LeRobot's own ACT and Diffusion Policy on the same demonstrations, with
the flags of examples/metaworld/baselines.py (shared with the main job's `--baseline`).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from baselines import REFERENCE_FLAGS  # examples/metaworld, on the path the runner sets


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    _: KW_ONLY  # everything else by name: a misplaced positional flag tuple would silently change the arm
    policy_type: str = "ki_vla"
    flags: tuple[str, ...] = ()
    pretrained_backbone: bool = True  # load the pretrained VLM (ki_vla arms)
    cotrain: bool = False  # mix the VLM corpus into training (ki_vla arms)
    naive_tokens: bool = False
    diagnostic: bool = False  # not one of the paper's arms: not in the default --arms

    @property
    def is_ki_vla(self) -> bool:
        return self.policy_type == "ki_vla"


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("ki", "KI: stop-gradient + FAST CE + VLM co-training", cotrain=True),
        Arm("ki_no_cotrain", "KI without VLM co-training"),
        Arm(
            "joint",
            "joint training (no stop-gradient), co-training",
            flags=("--policy.stop_gradient=false",),
            cotrain=True,
        ),
        Arm(
            "pi0",
            "pi0-style: flow loss only, no stop-gradient, no co-training",
            flags=("--policy.stop_gradient=false", "--policy.fast_loss_weight=0"),
        ),
        Arm(
            "joint_no_cotrain",
            "joint training (no stop-gradient) without co-training (diagnostic)",
            flags=("--policy.stop_gradient=false",),
            diagnostic=True,
        ),
        Arm("frozen", "frozen backbone: only the expert trains", flags=("--policy.train_expert_only=true",)),
        Arm("naive_tokens", "KI with naive 256-bin tokens instead of FAST", cotrain=True, naive_tokens=True),
        Arm("scratch", "KI from a random backbone (no pretraining)", cotrain=True, pretrained_backbone=False),
        Arm(
            "act",
            "LeRobot ACT (reference; ResNet-18 from scratch)",
            policy_type="act",
            flags=REFERENCE_FLAGS["act"],
        ),
        Arm(
            "diffusion",
            "LeRobot Diffusion Policy (reference; ResNet-18 from scratch)",
            policy_type="diffusion",
            flags=REFERENCE_FLAGS["diffusion"],
        ),
    )
}
KI_ARMS = tuple(name for name, arm in ARMS.items() if arm.is_ki_vla)
DEFAULT_ARMS = tuple(name for name, arm in ARMS.items() if not arm.diagnostic)


def parse_arms(text: str) -> list[Arm]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise ValueError(f"unknown arm(s) {unknown or text!r}; choose from {', '.join(ARMS)}")
    return [ARMS[n] for n in names]
