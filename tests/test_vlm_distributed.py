"""VLM co-training under `lerobot-train` with 2 DDP processes (CPU, gloo): each reads its own shard.

Launched as in test_distributed.py (`accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=true). A small
wrapper around LeRobot's train entry records, per process, the VLM records its stream read.
"""

from __future__ import annotations

import json

from conftest import logged_metric, logged_steps, run_logged
from test_distributed import two_cpu_processes
from vlm_fixtures import colour_records, save_hf_dataset

STEPS = 3

WRAPPER = """
import json, os, sys
import accelerate
from lerobot.scripts import lerobot_train
from lerobot_ki import vlm_data

OUT = os.environ["KI_TEST_DUMP_DIR"]
read = []
_next_record = vlm_data.VLMStream._next_record


def next_record(self):
    record = _next_record(self)
    read.append({"prompt": record["prompt"], "rank": self.rank, "world_size": self.world_size})
    return record


_end_training = accelerate.Accelerator.end_training


def end_training(self):
    with open(os.path.join(OUT, f"vlm_rank{self.process_index}.json"), "w") as f:
        json.dump(read, f)
    _end_training(self)


vlm_data.VLMStream._next_record = next_record
accelerate.Accelerator.end_training = end_training
sys.exit(lerobot_train.main())
"""


def test_ddp_processes_read_disjoint_vlm_shards(tmp_path, dataset_root, offline_env, tiny_train_args):
    records = colour_records(40, seed=4)
    for i, r in enumerate(records):
        r["prompt"] = f"Q{i}: {r['prompt']}"  # a unique prompt tells which record was read
    vlm = save_hf_dataset(tmp_path / "vlm", records)
    wrapper = tmp_path / "ki_vlm_dump.py"
    wrapper.write_text(WRAPPER)
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**offline_env, "KI_TEST_DUMP_DIR": str(dump), "ACCELERATE_USE_CPU": "true"}
    cmd = [
        *two_cpu_processes(wrapper),
        *tiny_train_args(
            dataset_root,
            tmp_path / "run",
            f"--policy.vlm_dataset={vlm}",
            "--policy.vlm_mix_ratio=0.6",  # 2 robot + 3 VLM examples per step and process
            f"--steps={STEPS}",
            "--batch_size=2",
            f"--log_freq={STEPS}",
            f"--save_freq={STEPS}",
            "--seed=1000",
        ),
    ]
    log = run_logged(cmd, env, tmp_path / "ddp.log", timeout=540)
    assert logged_steps(log) == [STEPS]
    assert logged_metric(log, "vlm_ratio") == [0.6]

    reads = [json.loads((dump / f"vlm_rank{r}.json").read_text()) for r in (0, 1)]
    for r, rank_reads in enumerate(reads):
        assert len(rank_reads) == 3 * STEPS
        assert {(x["rank"], x["world_size"]) for x in rank_reads} == {(r, 2)}
    prompts = [{x["prompt"] for x in rank_reads} for rank_reads in reads]
    assert len(prompts[0]) == len(prompts[1]) == 3 * STEPS  # no repeat within the epoch
    assert not prompts[0] & prompts[1], "both processes trained on the same VLM records"
