"""Where does one ki_vla inference call spend its GPU time? Profiles the eager sampler at full size
(batch 1, 2 cameras, bf16) by phase (SigLIP, backbone prefill, 10 expert steps) and by kernel, then times
the CUDA-graph call under the settings that change which kernels run. GPU only.

    HF_HUB_OFFLINE=1 python benchmarks/profile_ki_inference.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from vs_pi05_pi0fast import CHUNK, SIZES, build, make_batch, use_cameras

from lerobot_ki.model_inputs import robot_inputs
from lerobot_ki.vla_model import euler_steps

N_CAMS = 2


def phases(policy, batch) -> None:
    inputs = robot_inputs(batch, policy.config)
    model = policy.model
    with record_function("siglip+embed"):
        embs, pad = model.embed_prefix(inputs)
    with record_function("prefill"):
        _, kv = model.prefill(embs, pad)
    noise = torch.randn(1, CHUNK, policy.config.max_action_dim, device="cuda")
    with record_function("expert x10"):
        euler_steps(lambda x_t, t: model.velocity(kv, pad, x_t, t), noise, 10)
    torch.cuda.synchronize()


def graph_ms(policy, batch, repeats: int = 20) -> float:
    for _ in range(3):
        policy.predict_action_chunk(batch)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        policy.predict_action_chunk(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    size = SIZES["full"]
    policy = build("ki_vla", size, "bfloat16", "cuda").eval()
    use_cameras(policy, N_CAMS, size.resolution)
    batch = make_batch("ki_vla", policy, 1, N_CAMS, size.resolution, 50, "cuda")
    for _ in range(2):
        phases(policy, batch)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        phases(policy, batch)
    avg = prof.key_averages()
    print("phase GPU time (ms):")
    for name in ("siglip+embed", "prefill", "expert x10"):
        ev = next((e for e in avg if e.key == name), None)
        if ev is not None:
            print(f"  {name:14s} {ev.device_time_total / 1e3:8.2f}")
    print(avg.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))

    print("graph call, batch 1, 2 cameras (ms):")
    print(f"  as built (vision tower fp32, TF32 off): {graph_ms(policy, batch):.1f}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    policy._graphed = None  # kernels are chosen at capture: record again
    print(f"  + TF32 for the fp32 vision tower:        {graph_ms(policy, batch):.1f}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    policy._graphed = None
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the fp32 vision tower and norms run in bf16
        print(f"  whole call under bf16 autocast:          {graph_ms(policy, batch):.1f}")


if __name__ == "__main__":
    main()
