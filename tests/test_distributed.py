"""`lerobot-train --policy.type=ki_vla` under DDP: 2 CPU processes over gloo, launched by `accelerate launch`.

LeRobot saves checkpoints on the main process only, so each rank's parameters are dumped by a wrapper around
LeRobot's own train entry (`lerobot.scripts.lerobot_train.main`): it hooks `Accelerator.prepare` (the
policy as built, before DDP wraps it), LeRobot's `update_policy` (which samples each rank trained on) and
`Accelerator.end_training` (which `train()` calls on every rank after the last step and a barrier).

Launcher note: `accelerate launch --cpu --num_processes 2` starts ONE process when no mpirun hostfile is
given (accelerate's simple launcher), so it would not test DDP at all. `--multi_gpu` makes accelerate use
torchrun, and LeRobot's `Accelerator(cpu=True)` (from --policy.device=cpu) then runs MULTI_CPU over gloo.
"""

from __future__ import annotations

import json
import socket

import torch
from conftest import logged_steps, run_logged, venv_script
from safetensors.torch import load_file

STEPS = 4

WRAPPER = """
import os, sys
import torch
import accelerate
from lerobot.scripts import lerobot_train

OUT = os.environ["KI_TEST_DUMP_DIR"]
record = {"indices": []}


def snapshot(module):
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


_prepare = accelerate.Accelerator.prepare


def prepare(self, *args, **kwargs):
    for obj in args:
        if isinstance(obj, torch.nn.Module) and "initial" not in record:
            record["initial"] = snapshot(obj)
    return _prepare(self, *args, **kwargs)


_update_policy = lerobot_train.update_policy


def update_policy(train_metrics, policy, batch, *args, **kwargs):
    record["indices"].append(batch["index"].tolist())
    return _update_policy(train_metrics, policy, batch, *args, **kwargs)


_make_processors = lerobot_train.make_pre_post_processors


def make_pre_post_processors(*args, **kwargs):
    from lerobot_ki.fast_artifacts import fast_to_tensor
    from lerobot_ki.processor_ki import fast_tokenizer_of

    pre, post = _make_processors(*args, **kwargs)
    record["fast"] = fast_to_tensor(fast_tokenizer_of(pre))
    return pre, post


_end_training = accelerate.Accelerator.end_training


def end_training(self):
    model = self.unwrap_model(self._models[0])
    record.update(
        final=snapshot(model),
        rank=self.process_index,
        world_size=self.num_processes,
        distributed_type=str(self.distributed_type),
        env_rank=os.environ.get("RANK"),
    )
    torch.save(record, os.path.join(OUT, f"params_rank{self.process_index}.pt"))
    _end_training(self)


accelerate.Accelerator.prepare = prepare
accelerate.Accelerator.end_training = end_training
lerobot_train.update_policy = update_policy
lerobot_train.make_pre_post_processors = make_pre_post_processors
sys.exit(lerobot_train.main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_cpu_processes(script) -> list[str]:
    """`accelerate launch` of `script` as 2 DDP processes on CPU (with ACCELERATE_USE_CPU=true in the env:
    `--cpu --num_processes 2` starts only one process)."""
    return [
        venv_script("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
    ]


def test_ddp_two_cpu_ranks_train_in_lockstep(tmp_path, dataset_root, offline_env, tiny_train_args):
    wrapper = tmp_path / "ki_train_dump.py"
    wrapper.write_text(WRAPPER)
    dump = tmp_path / "dump"
    dump.mkdir()
    output_dir = tmp_path / "run"
    env = {**offline_env, "KI_TEST_DUMP_DIR": str(dump), "ACCELERATE_USE_CPU": "true"}
    cmd = [
        *two_cpu_processes(wrapper),
        *tiny_train_args(
            dataset_root,
            output_dir,
            f"--steps={STEPS}",
            "--batch_size=2",
            "--log_freq=2",
            f"--save_freq={STEPS}",
            "--seed=1000",
        ),
    ]
    log = run_logged(cmd, env, tmp_path / "ddp.log", timeout=540)

    assert "Effective batch size: 2 x 2 = 4" in log
    assert logged_steps(log) == [2, 4]
    ranks = [torch.load(dump / f"params_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(p.name for p in dump.iterdir()) == ["params_rank0.pt", "params_rank1.pt"]
    for r, rec in enumerate(ranks):
        assert (rec["rank"], rec["world_size"], rec["env_rank"]) == (r, 2, str(r))
        assert rec["distributed_type"].endswith("MULTI_CPU")
        assert len(rec["indices"]) == STEPS and all(len(b) == 2 for b in rec["indices"])

    # The ranks read different samples, so equal weights below come from the gradient all-reduce.
    assert ranks[0]["indices"] != ranks[1]["indices"]
    # Each rank's preprocessor fitted the FAST tokenizer itself, to the same result (the FAST labels agree
    # across ranks).
    fast0, fast1 = (rec["fast"] for rec in ranks)
    assert fast0.numel() > 100 and torch.equal(fast0, fast1)

    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    assert final0.keys() == final1.keys() == ranks[0]["initial"].keys()
    differing = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not differing, f"ranks diverged on {len(differing)} tensors, e.g. {differing[:5]}"
    floats = [k for k in final0 if final0[k].is_floating_point()]
    changed = [k for k in floats if not torch.equal(final0[k], ranks[0]["initial"][k])]
    assert len(changed) > 0.5 * len(floats), f"only {len(changed)}/{len(floats)} tensors moved in training"

    # The main process saved the synced weights.
    ckpt = output_dir / "checkpoints" / f"{STEPS:06d}"
    saved = load_file(ckpt / "pretrained_model" / "model.safetensors")
    assert saved.keys() <= final0.keys()
    assert all(torch.equal(saved[k], final0[k]) for k in saved)
    step_state = json.loads((ckpt / "training_state" / "training_step.json").read_text())
    assert step_state["step"] == STEPS and step_state.get("num_processes") == 2
