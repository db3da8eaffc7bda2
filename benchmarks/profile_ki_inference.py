"""Where does one ki_vla inference call spend its GPU time? Profiles the eager sampler at full size
(batch 1, 2 cameras, bf16) with the default flags (step plan, one SigLIP pass over both cameras, SigLIP
under bf16 autocast) by phase (SigLIP + embedding, backbone prefill, 10 expert steps) and by kernel, then
times the CUDA-graph call: what the kernels cost against what launching them costs. GPU only.

    HF_HUB_OFFLINE=1 python benchmarks/profile_ki_inference.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from vs_pi05_pi0fast import CHUNK, SIZES, build, make_batch, use_cameras

from lerobot_ki.model_inputs import robot_inputs
from lerobot_ki.vla_model import euler_steps, euler_times

N_CAMS = 2


def phases(policy, batch) -> None:
    """The default sampler (`KIModel.sample_actions` without RTC) split into its three phases."""
    inputs = robot_inputs(batch, policy.config)
    model = policy.model
    with record_function("siglip+embed"):
        embs, pad = model.embed_prefix(inputs)
    with record_function("prefill"):
        _, kv = model.prefill(embs, pad)
    noise = torch.randn(1, CHUNK, policy.config.max_action_dim, device=embs.device)
    with record_function("expert x10"):
        plan = model.plan_steps(pad, CHUNK, euler_times(10))  # the step plan, once per call
        mods = iter(plan.modulations)

        def velocity(x_t, t):
            return model.velocity(kv, pad, x_t, t, None, plan.geometry, next(mods))

        euler_steps(velocity, noise, 10)
    if noise.is_cuda:
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

    busy = sum(e.self_device_time_total for e in avg) / 1e3
    print(f"GPU busy time of the eager call (sum of kernels): {busy:.1f} ms")
    print(f"CUDA-graph call, batch 1, 2 cameras, median of 20: {graph_ms(policy, batch):.1f} ms")


if __name__ == "__main__":
    main()
