"""`lerobot-train --policy.type=ki_vla` sharded by Accelerate's FSDP plugin (examples/accelerate/fsdp.yaml):
2 CPU processes over gloo, checked against the same run under DDP.

Accelerate and PyTorch refuse FSDP on CPU in two places; tests/fsdp_cpu_train.py says which and lifts exactly
those, so that LeRobot's own training entry, checkpoint gathering and `--resume` run unchanged. The two
processes see different samples and draw their own flow noise, so a 1-process run cannot give the same losses;
DDP with the same launch, seed and data split can, and does what FSDP must be equivalent to.

One module fixture runs, in order: DDP (4 steps, checkpoints at 2 and 4), FSDP with gradient checkpointing
(the same), then each resumed from its step-2 checkpoint (LeRobot's resume rewrites step 4, so the step-4
checkpoints are read before). VLM co-training is on in all four, so its stream state crosses the save too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_logged, venv_script
from safetensors.torch import load_file
from test_distributed import free_port
from test_e2e_lerobot import FAST_STATE, chunk, load_policy, observation
from vlm_fixtures import colour_records, save_hf_dataset

LAUNCHER = Path(__file__).with_name("fsdp_cpu_train.py")
FSDP_CONFIG = Path(__file__).parent.parent / "examples" / "accelerate" / "fsdp.yaml"
STEPS, RESUME_AT = 4, 2


def launch(kind: str, args: list[str], dump: Path, env: dict, log: Path) -> tuple[str, list[dict]]:
    """2 CPU processes of LeRobot's train entry (through tests/fsdp_cpu_train.py), `kind` fsdp or ddp;
    returns the log and each rank's record (losses, sample indices, FSDP units)."""
    dump.mkdir(parents=True)
    mode = ["--config_file", str(FSDP_CONFIG)] if kind == "fsdp" else ["--multi_gpu"]
    cmd = [
        venv_script("accelerate"),
        "launch",
        *mode,
        *("--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port())),
        str(LAUNCHER),
        *args,
    ]
    env = {**env, "KI_TEST_DUMP_DIR": str(dump), "ACCELERATE_USE_CPU": "true"}
    out = run_logged(cmd, env, log, timeout=480)
    return out, [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def step_checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"{step:06d}" / "pretrained_model"


@pytest.fixture(scope="module")
def runs(dataset_root, offline_env, tiny_train_args, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    vlm = save_hf_dataset(tmp / "vlm", colour_records(24, seed=3))
    common = [
        f"--steps={STEPS}",
        "--batch_size=2",
        "--log_freq=1",
        f"--save_freq={RESUME_AT}",
        "--seed=1000",
        f"--policy.vlm_dataset={vlm}",
        "--policy.vlm_mix_ratio=0.5",
    ]
    result = {}
    for kind, extra in (("ddp", []), ("fsdp", ["--policy.gradient_checkpointing=true"])):
        out_dir = tmp / kind
        log, ranks = launch(
            kind,
            tiny_train_args(dataset_root, out_dir, *common, *extra),
            tmp / f"{kind}_dump",
            offline_env,
            tmp / f"{kind}.log",
        )
        final = step_checkpoint(out_dir, STEPS)
        result[kind] = dict(
            log=log,
            ranks=ranks,
            weights=load_file(final / "model.safetensors"),
            fast=(final / FAST_STATE).read_bytes(),
            loaded=load_policy(final),
        )
    for kind in ("ddp", "fsdp"):
        config = step_checkpoint(tmp / kind, RESUME_AT) / "train_config.json"
        resume = ["--resume=true", f"--config_path={config}", f"--steps={STEPS}", "--log_freq=1"]
        log, ranks = launch(
            kind, resume, tmp / f"{kind}_resume_dump", offline_env, tmp / f"{kind}_resume.log"
        )
        result[f"{kind}_resume"] = dict(log=log, ranks=ranks)
    return result


def test_fsdp_shards_every_layer_and_trains_like_ddp(runs):
    ddp, fsdp = runs["ddp"]["ranks"], runs["fsdp"]["ranks"]
    policy = runs["ddp"]["loaded"][0]
    towers = policy.model.paligemma_with_expert
    depth, vision_depth = (
        len(towers.language_model.layers),
        len(towers.paligemma.model.vision_tower.vision_model.encoder.layers),
    )
    for r, rec in enumerate(fsdp):
        assert rec["rank"] == r and rec["distributed_type"].endswith(".FSDP")
        assert ddp[r]["distributed_type"].endswith("MULTI_CPU") and not ddp[r]["units"]
        units = {name.replace("_fsdp_wrapped_module.", ""): cls for name, cls in rec["units"].items()}
        towers_key = "model.paligemma_with_expert."
        backbone = towers_key + "paligemma.model.language_model.layers"
        expert = towers_key + "gemma_expert.model.layers"
        vision = towers_key + "paligemma.model.vision_tower.vision_model.encoder.layers"
        wanted = {
            **{f"{stack}.{i}": "KIDecoderLayer" for stack in (backbone, expert) for i in range(depth)},
            **{f"{vision}.{i}": "SiglipEncoderLayer" for i in range(vision_depth)},
            "": "KIPolicy",
        }
        assert units == wanted
        # Sharded: each rank holds half the parameters (flat shards, padded to an even split).
        assert rec["local_numel"] <= 0.5 * ddp[r]["local_numel"] + 64
        # Same samples, same seeds, same steps: the losses are DDP's to float rounding (the gradient is
        # reduce-scattered instead of all-reduced, and recomputed under gradient checkpointing).
        assert rec["indices"] == ddp[r]["indices"]
        assert len(rec["losses"]) == STEPS
        torch.testing.assert_close(
            torch.tensor(rec["losses"]), torch.tensor(ddp[r]["losses"]), rtol=1e-5, atol=0
        )
    assert fsdp[0]["indices"] != fsdp[1]["indices"]


def test_fsdp_checkpoint_loads_in_one_process_and_acts_like_ddp(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    # The gathered full state dict, written by rank 0: every tensor DDP saved, VLM stream state included.
    assert fsdp["weights"].keys() == ddp["weights"].keys()
    for key, value in ddp["weights"].items():
        # A key bias adds the same q.b to every logit of a query, which softmax ignores: its gradient is zero
        # in exact arithmetic, so Adam's update of it is normalised float noise, which DDP's and FSDP's
        # reduction orders make differently (seen on 2026-12-08: 2e-6 apart on values of 1e-5). It only has
        # to stay at noise level in both.
        atol = 1e-4 if key.endswith("self_attn.k_proj.bias") else 1e-6
        torch.testing.assert_close(fsdp["weights"][key], value, rtol=1e-4, atol=atol, msg=key)
    assert torch.equal(fsdp["weights"]["vlm_cotraining.state"], ddp["weights"]["vlm_cotraining.state"])
    assert fsdp["weights"]["vlm_cotraining.state"].sum() > 0
    assert fsdp["fast"] == ddp["fast"]  # the fitted FAST tokenizer, byte for byte
    obs = observation(batch=2, seed=5)
    (policy_f, pre_f, _), (policy_d, pre_d, _) = fsdp["loaded"], ddp["loaded"]
    a_f, a_d = chunk(policy_f, pre_f, obs, seed=11), chunk(policy_d, pre_d, obs, seed=11)
    assert torch.isfinite(a_f).all()
    torch.testing.assert_close(a_f, a_d, rtol=1e-4, atol=1e-5)
    assert (a_f - chunk(policy_f, pre_f, obs, seed=12)).abs().max() > 1e-3  # the seed matters: not moot


def test_fsdp_resume_continues_like_ddp_resume(runs):
    """LeRobot's resume restores weights, optimizer, scheduler, data order and the main process's RNG,
    not each rank's: a resumed run's losses differ from the uninterrupted run's, under DDP as under FSDP.
    What FSDP must do is what DDP does: from equal checkpoints, equal losses, the second step reading the
    reloaded (under FSDP, resharded) optimizer state."""
    for kind in ("ddp", "fsdp"):
        log = runs[f"{kind}_resume"]["log"]
        assert f"Resuming data order at epoch 0, sample {2 * 2 * RESUME_AT}" in log
    ddp, fsdp = runs["ddp_resume"]["ranks"], runs["fsdp_resume"]["ranks"]
    for r in (0, 1):
        assert fsdp[r]["distributed_type"].endswith(".FSDP")
        assert fsdp[r]["indices"] == ddp[r]["indices"] == runs["ddp"]["ranks"][r]["indices"][RESUME_AT:]
        assert len(fsdp[r]["losses"]) == STEPS - RESUME_AT
        torch.testing.assert_close(
            torch.tensor(fsdp[r]["losses"]), torch.tensor(ddp[r]["losses"]), rtol=1e-5, atol=0
        )
