"""LeRobot's own training entry (`lerobot.scripts.lerobot_train.main`) under Accelerate's FSDP plugin on CPU,
for tests/test_fsdp.py. Launched by `accelerate launch --use_fsdp --multi_gpu` with ACCELERATE_USE_CPU=true.

Two things refuse FSDP on CPU, and this file lifts exactly those, in this process only:

1. Accelerate 1.15 enables FSDP only for GPU-like distributed types: `AcceleratorState` turns a CPU run with
   ACCELERATE_USE_FSDP=true into MULTI_CPU (plain DDP over gloo) without a word. After its `__init__`, a
   MULTI_CPU state with an FSDP plugin is set to FSDP, as it would be on GPUs.
2. Full state dicts gathered with `offload_to_cpu=True`, which LeRobot's `gather_fsdp_state_dicts` (each
   checkpoint) and Accelerate's `get_state_dict` (end of training) hard-code, crash PyTorch 2.11's FSDP1
   on CPU tensors: a segmentation fault in the state-dict hook's clone, for any model. On CPU the tensors
   are on the host already: the same gathers with `offload_to_cpu=False` (still `rank0_only=True`) are the
   same operation without the copy.

Everything else (wrapping by `KIPolicy._no_split_modules`, sharded training, LeRobot's checkpoint writing,
`--resume` with `load_fsdp_optimizer_state`) runs unchanged. Each rank dumps what the test compares into
KI_TEST_DUMP_DIR: per-step losses, the sample indices, and which modules FSDP wrapped.
"""

from __future__ import annotations

import os
import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from lerobot.scripts import lerobot_train
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)

OUT = os.environ["KI_TEST_DUMP_DIR"]
record: dict = {"losses": [], "indices": []}

_state_init = AcceleratorState.__init__


def state_init(self, *args, fsdp_plugin=None, **kwargs):
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        # Every later AcceleratorState() copies PartialState's fields over its own: set both. "cpu", not
        # MULTI_CPU's "cpu:0", is what FSDP calls the host device.
        for shared in (self.__dict__, PartialState._shared_state):
            shared.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
        self.fsdp_plugin = fsdp_plugin
        fsdp_plugin.state_dict_config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        fsdp_plugin.optim_state_dict_config = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)


def gather_fsdp_state_dicts(model, optimizer):
    """LeRobot's gather, without the host copy that crashes on CPU tensors."""
    state_cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    optim_cfg = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, state_cfg, optim_cfg):
        return model.state_dict(), FullyShardedDataParallel.optim_state_dict(model, optimizer)


_get_state_dict = accelerate.Accelerator.get_state_dict


def get_state_dict(self, model, unwrap=True):
    """Accelerate's FSDP1 gather at the end of training, without the host copy."""
    if self.distributed_type != DistributedType.FSDP:
        return _get_state_dict(self, model, unwrap)
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


_update_policy = lerobot_train.update_policy


def update_policy(train_metrics, policy, batch, optimizer, grad_clip_norm, accelerator, *args, **kwargs):
    if "units" not in record:  # the prepared policy, first step: what FSDP made of it
        units = {n: m for n, m in policy.named_modules() if isinstance(m, FullyShardedDataParallel)}
        record["units"] = {n: type(m.module).__name__ for n, m in units.items()}
        record["local_numel"] = sum(p.numel() for p in policy.parameters())
        record["distributed_type"] = str(accelerator.distributed_type)
        record["rank"] = int(os.environ["RANK"])
    record["indices"].append(batch["index"].tolist())
    train_metrics, output = _update_policy(
        train_metrics, policy, batch, optimizer, grad_clip_norm, accelerator, *args, **kwargs
    )
    record["losses"].append(float(train_metrics.loss.val))
    return train_metrics, output


_end_training = accelerate.Accelerator.end_training


def end_training(self):
    torch.save(record, os.path.join(OUT, f"rank{self.process_index}.pt"))
    _end_training(self)


AcceleratorState.__init__ = state_init
lerobot_train.gather_fsdp_state_dicts = gather_fsdp_state_dicts
lerobot_train.update_policy = update_policy
accelerate.Accelerator.end_training = end_training
accelerate.Accelerator.get_state_dict = get_state_dict
sys.exit(lerobot_train.main())
