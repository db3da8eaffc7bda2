"""Control-loop timing of ki_vla under `lerobot-rollout`, sync vs Real-Time Chunking. Not a test: it prints
markdown tables.

1. With a checkpoint (CPU): runs the real `lerobot-rollout` CLI (sentry strategy, video recording) against the
   simulated robot of tests/plugins/ for `--seconds`, once with `--inference.type=sync` and once with
   `--inference.type=rtc`, and reads back when the robot got each command. It also times one action chunk
   in-process (plain, with a committed prefix inpainted as a training-time RTC checkpoint does, and
   RTC-guided by it).

    python benchmarks/rollout_timing.py --policy.path=outputs/ki_tiny/checkpoints/last/pretrained_model

2. Without one (any device): times one chunk of a freshly built preset (random weights, byte tokenizer;
   the real preset is PaliGemma 3B + the 300M expert at 224 px, 50-step chunks; `cpu` is
   benchmarks/vs_pi05_pi0fast.py's CPU size: the real widths, one layer per tower, MLPs 1/8 wide, 224 px),
   plain, training-time RTC and RTC-guided (and guided as it ran before the expert left autograd; on CUDA
   also guided with no CUDA graphs, as it ran before its prefill and expert step were recorded, and the
   largest difference between the graphed and the eager guided chunk from the same noise).

    python benchmarks/rollout_timing.py --preset real --device cuda --dtype bfloat16
    OMP_NUM_THREADS=1 python benchmarks/rollout_timing.py --size cpu --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "plugins"))
from lerobot_robot_ki_testbot.discovery import discoverable_env  # noqa: E402

from lerobot_ki import vla_model  # noqa: E402
from lerobot_ki.modeling_ki import KIPolicy  # noqa: E402


def rollout_ticks(policy_path: str, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run lerobot-rollout on the test robot; statistics of the command times it logged."""
    env = discoverable_env(dict(os.environ), out / "dist")
    env.setdefault("OMP_NUM_THREADS", "1")  # see tests/rollout_setup.py: oversubscription stalls ticks
    cmd = [
        str(Path(sys.executable).parent / "lerobot-rollout"),
        f"--policy.path={policy_path}",
        "--robot.type=ki_testbot",
        f"--robot.log_path={out / 'robot.jsonl'}",
        "--strategy.type=sentry",
        "--dataset.repo_id=local/rollout_timing",
        f"--dataset.root={out / 'dataset'}",
        f"--robot.image_size={args.image_size}",
        f"--dataset.single_task={args.task}",
        f"--dataset.fps={args.fps}",
        "--dataset.push_to_hub=false",
        f"--fps={args.fps}",
        f"--duration={args.seconds}",
        "--device=cpu",
        "--play_sounds=false",
        "--return_to_initial_position=false",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise SystemExit(f"lerobot-rollout failed ({proc.returncode}):\n{tail}")
    events = [json.loads(line) for line in (out / "robot.jsonl").read_text().splitlines()]
    times = np.array([e["t"] for e in events if e["event"] == "action"])
    commands = np.array([e["command"] for e in events if e["event"] == "action"])
    steady = np.diff(times[1:])  # the first tick also pays for the first inference and encoder start-up
    return {
        "commands": len(times),
        "first_s": times[0] - events[0]["t"],
        "hz": len(steady) / (times[-1] - times[1]),
        "p50_ms": 1000 * np.median(steady),
        "p99_ms": 1000 * np.percentile(steady, 99),
        "max_ms": 1000 * steady.max(),
        "max_jump": float(np.abs(np.diff(commands, axis=0)).max()),
    }


def fake_batch(policy: KIPolicy, device: str) -> dict:
    """A preprocessed batch of one (what the ki_vla preprocessor hands the policy): images, prompt tokens."""
    cfg = policy.config
    batch = {
        key: torch.rand(1, *feat.shape, device=device)
        for key, feat in cfg.input_features.items()
        if key.startswith("observation.images.")
    }
    state_dim = cfg.input_features["observation.state"].shape[0]
    batch["observation.state"] = torch.zeros(1, state_dim, device=device)
    batch["observation.language.tokens"] = torch.randint(4, 260, (1, cfg.tokenizer_max_length), device=device)
    batch["observation.language.attention_mask"] = torch.ones(1, cfg.tokenizer_max_length, device=device)
    return batch


def chunk_latency_ms(policy: KIPolicy, device: str, repeats: int) -> dict[str, float]:
    """Median ms of one chunk: sync, training-time RTC (committed prefix inpainted), RTC-guided (what
    the RTC engine calls each re-plan), RTC-guided with the expert under autograd (how guidance ran
    before `vla_model.guidance_differentiates_velocity`; the same chunk) and, on CUDA, RTC-guided without
    CUDA graphs (`cuda_graphs=false`: how it ran before `GraphedSampler.guided`). The calls take turns,
    `repeats` rounds after two warm-up rounds, so load from other jobs on a shared machine falls on all
    alike. On CUDA, `guided_graph_max_diff` is the largest difference between the graphed and the eager
    guided chunk from the same noise."""
    from lerobot.policies.rtc.configuration_rtc import RTCConfig

    batch = fake_batch(policy, device)
    cfg = policy.config
    prefix = policy.predict_action_chunk(batch)[0]  # (T, A): a committed chunk
    rtc_call = {"inference_delay": 2, "prev_chunk_left_over": prefix[3:]}
    max_delay = cfg.rtc_training_max_delay

    def sync() -> None:
        cfg.rtc_config, cfg.rtc_training_max_delay = None, max_delay
        policy.init_rtc_processor()
        policy.predict_action_chunk(batch)

    def trained() -> None:  # as lerobot-rollout --inference.type=rtc runs a training-time RTC checkpoint
        cfg.rtc_config, cfg.rtc_training_max_delay = RTCConfig(execution_horizon=cfg.chunk_size), 2
        policy.init_rtc_processor()
        policy.predict_action_chunk(batch, **rtc_call)

    def guided() -> torch.Tensor:
        cfg.rtc_config, cfg.rtc_training_max_delay = RTCConfig(execution_horizon=cfg.chunk_size), 0
        policy.init_rtc_processor()
        return policy.predict_action_chunk(batch, **rtc_call)

    def guided_autograd() -> None:
        probe = vla_model.guidance_differentiates_velocity
        vla_model.guidance_differentiates_velocity = lambda: True  # the expert's graph recorded, unused
        try:
            guided()
        finally:
            vla_model.guidance_differentiates_velocity = probe

    def guided_eager() -> torch.Tensor:
        cfg.cuda_graphs = False
        try:
            return guided()
        finally:
            cfg.cuda_graphs = True

    calls = {"sync": sync, "trained": trained, "guided": guided, "guided_autograd": guided_autograd}
    cuda = device.startswith("cuda") and cfg.cuda_graphs
    if cuda:
        calls["guided_eager"] = guided_eager
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats + 2):
        for name, call in calls.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    diff = None
    if cuda:  # the graphed guided chunk against the eager one, from the same noise
        chunks = []
        for call in (guided, guided_eager):
            torch.manual_seed(7)
            chunks.append(call().float())
        diff = float((chunks[0] - chunks[1]).abs().max())
    cfg.rtc_config, cfg.rtc_training_max_delay = None, max_delay
    policy.init_rtc_processor()
    ms = {name: 1000 * statistics.median(t[2:]) for name, t in times.items()}  # two warm-ups
    ms["guided_graph_max_diff"] = diff
    # Per round, each call over the sync call of the same round, then the median: load that drifts over the
    # run (other jobs on a shared machine) cancels within a round, where it skews the medians' ratio.
    for name in ("trained", "guided", "guided_autograd", *(["guided_eager"] if cuda else [])):
        rounds = zip(times[name][2:], times["sync"][2:], strict=True)
        ms[f"{name}_paired"] = statistics.median(t / s for t, s in rounds)
    return ms


def preset_policy(preset: str, device: str, dtype: str) -> KIPolicy:
    from lerobot.configs import FeatureType, PolicyFeature

    from lerobot_ki.configuration_ki import KIConfig

    full_width = preset in ("real", "cpu")
    if preset == "cpu":  # the CPU size of vs_pi05_pi0fast.py: its variant tables, patched in this process
        from vs_pi05_pi0fast import SIZES, patch_depth

        patch_depth(SIZES["cpu"].depth, SIZES["cpu"].mlp_divisor)
    size = 224 if full_width else 64
    cfg = KIConfig(
        paligemma_variant="gemma_2b" if full_width else "tiny",
        action_expert_variant="gemma_300m" if full_width else "tiny",
        text_tokenizer="byte",  # offline; the prompt length, not the vocabulary, sets the cost
        tokenizer_max_length=200 if full_width else 96,
        image_resolution=(size, size),
        dtype=dtype,
        device=device,
    )
    cfg.input_features = {
        f"observation.images.{cam}": PolicyFeature(FeatureType.VISUAL, (3, size, size))
        for cam in ("top", "wrist")
    }
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (6,))
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (6,))}
    with torch.device(device):  # built where it runs: no 4B-parameter float32 copy on the host first
        return KIPolicy(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policy.path", dest="policy_path")
    p.add_argument("--preset", "--size", dest="preset", choices=("tiny", "cpu", "real"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--task", default="push the red block left")
    p.add_argument("--image-size", type=int, default=224, help="the test robot's camera frames (square)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if bool(args.policy_path) == bool(args.preset):
        raise SystemExit("pass one of --policy.path (rollout + chunk timing) or --preset (chunk timing)")

    if args.preset:
        policy = preset_policy(args.preset, args.device, args.dtype)
        device = args.device
    else:
        policy = KIPolicy.from_pretrained(args.policy_path).to("cpu").eval()
        device = "cpu"
    ms = chunk_latency_ms(policy, device, args.repeats)
    cfg = policy.config
    print(
        f"\none chunk ({cfg.chunk_size} steps, {cfg.num_inference_steps} Euler steps, batch 1, {device}, "
        f"{cfg.paligemma_variant}+{cfg.action_expert_variant}, {cfg.image_resolution[0]} px, {cfg.dtype}; "
        f"median of {args.repeats}, delay 2):"
    )
    print(
        "| sync chunk | training-time RTC chunk | RTC-guided chunk | RTC-guided, expert under autograd "
        "| training-time RTC / sync | RTC-guided / sync | guided under autograd / sync |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {ms['sync']:.1f} ms | {ms['trained']:.1f} ms | {ms['guided']:.1f} ms "
        f"| {ms['guided_autograd']:.1f} ms "
        f"| {ms['trained'] / ms['sync']:.3f} | {ms['guided'] / ms['sync']:.3f} "
        f"| {ms['guided_autograd'] / ms['sync']:.3f} |"
    )
    print(
        f"median of the per-round ratios to sync: training-time RTC {ms['trained_paired']:.3f}, "
        f"RTC-guided {ms['guided_paired']:.3f}, guided under autograd {ms['guided_autograd_paired']:.3f}"
    )
    if "guided_eager" in ms:
        print(
            f"RTC-guided without CUDA graphs (cuda_graphs=false): {ms['guided_eager']:.1f} ms, "
            f"{ms['guided_eager'] / ms['sync']:.3f} x sync (paired {ms['guided_eager_paired']:.3f}); "
            f"graphed vs eager guided chunk, same noise: max abs difference {ms['guided_graph_max_diff']:.3g}"
        )
    if not args.policy_path:
        return

    # LeRobot's defaults (guide 10 steps, re-plan when 30 are left), scaled down for short chunks.
    rtc = [
        "--inference.type=rtc",
        f"--inference.rtc.execution_horizon={min(10, cfg.chunk_size)}",
        f"--inference.queue_threshold={min(30, cfg.chunk_size - 2)}",
    ]
    print(
        f"\nlerobot-rollout on the test robot, {args.fps} Hz target, {args.seconds:.0f} s, sentry + video "
        f"of two {args.image_size} px cameras:"
    )
    print("| inference | commands | first after | achieved Hz | tick p50 | tick p99 | tick max | max jump |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("sync", []), ("rtc", rtc)):
            r = rollout_ticks(args.policy_path, Path(tmp) / name, args, extra)
            print(
                f"| {name} | {r['commands']} | {r['first_s']:.2f} s | {r['hz']:.2f} | {r['p50_ms']:.0f} ms "
                f"| {r['p99_ms']:.0f} ms | {r['max_ms']:.0f} ms | {r['max_jump']:.2f} |"
            )


if __name__ == "__main__":
    main()
