"""ki_vla against LeRobot's pi05 and pi0_fast, same size and same inputs, in one run: inference latency per
action chunk (batch 1; 1, 2, 3 cameras), training step time (forward + backward + AdamW) and peak memory
(batch 8 and 32; on CPU 8). Medians over repeats after warm-up. Prints a markdown table; `--json` keeps
every measurement. ki_vla is measured once per optimisation step (`--ki-variants final` skips that).

    # GPU, full size (PaliGemma 3B + Gemma 300M expert), bf16
    HF_HUB_OFFLINE=1 python benchmarks/vs_pi05_pi0fast.py --size full --device cuda
    # CPU: the smallest size all three build (see SIZES), about 10 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/vs_pi05_pi0fast.py --size cpu
    # CPU, ki_vla's tiny preset only (pi05 and pi0_fast do not build at it): issue 17's rows
    HF_HUB_OFFLINE=1 python benchmarks/vs_pi05_pi0fast.py --size tiny --policies ki_vla --ki-variants issue17
    # GPU: the compiled expert in each --policy.compile_mode, and LeRobot pi05 with its compile_model=true
    HF_HUB_OFFLINE=1 python benchmarks/vs_pi05_pi0fast.py --size full --no-train --ki-variants compiled \
        --policies ki_vla,pi05_compiled --cameras 2

Every inference row also records its first call (CUDA-graph capture, torch.compile) as `first_ms` in the JSON.
`benchmarks/gpu_figures.sh` runs the GPU rows the README quotes in one go.

Issue 17's optimisations (`lerobot_ki.transformer.FastPaths`: step plan, fused projections, batched SigLIP)
are measured on one ki_vla policy, each on its own and all together against all off ("today"), taking turns
call by call so that the load of a shared machine falls on all of them alike; each one's chunk is checked
against today's from the same noise, and the new default's speed-up over today is printed. Training is not
timed for them: with gradients on, all of them run today's path.

What is held equal: the backbone and expert sizes (LeRobot's pi05 only builds with a 2048-wide backbone and
pi0_fast only at 224 px, so the CPU size patches pi05, pi0_fast and ki_vla alike, in this process: fewer
layers, narrower MLPs, a shallower SigLIP), dtype, images, prompt (padded to 200 tokens, as all three
processors do), 10 flow steps, chunk 50. The peers run as LeRobot runs them; nothing in LeRobot's files is
modified. pi0_fast cannot be built offline (its constructor downloads the FAST and PaliGemma tokenizers),
so it is handed local stand-ins (`_LocalTokenizers`); its decoding is timed for exactly `--fast-tokens`
greedy tokens (the stand-in's end-of-action id never matches) and its detokenisation (a CPU step) is not
timed. Its training batch carries FAST tokens padded to its `max_action_tokens` (256), as its processor
makes them.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi0_fast import modeling_pi0_fast
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
from lerobot.policies.pi05 import modeling_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.utils.constants import (
    ACTION,
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
)
from transformers.models.auto import CONFIG_MAPPING

from lerobot_ki import model_inputs, variants
from lerobot_ki.configuration_ki import EXPERT_COMPILE_MODES, PALIGEMMA_TOKENIZER, KIConfig
from lerobot_ki.fast_artifacts import DEFAULT_MAX_FAST_TOKENS
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.transformer import fast_paths

STATE_DIM, ACTION_DIM, CHUNK, PROMPT_LEN, PROMPT_VALID = 8, 7, 50, 200, 48
CAMERAS = [f"observation.images.cam{i}" for i in range(3)]


@dataclass
class Size:
    depth: int | None  # None: the real 18 layers
    resolution: int
    frozen_embeddings: bool  # token embedding + LM head frozen in all three (CPU memory)
    note: str
    mlp_divisor: int = 1  # MLP hidden width divided by this in both towers
    ki_variant: str | None = None  # ki_vla's preset for backbone and expert (None: pi05's sizes)


SIZES = {
    "full": Size(None, 224, False, "full size: PaliGemma 3B (SigLIP So400m + Gemma 2B) + Gemma 300M expert"),
    "cpu": Size(
        1,
        224,  # pi0_fast's SigLIP is fixed at 224 px
        True,
        "real attention widths, 1 layer per tower (Gemma 2048 backbone, 1024 expert, SigLIP 1152, 257k "
        "vocab), MLPs 1/8 wide, 224 px; vision tower, token embedding and LM head frozen in all three",
        mlp_divisor=8,
    ),
    "tiny": Size(
        None,
        96,
        False,
        "ki_vla's tiny preset (backbone 128 wide, expert 64, SigLIP 96, 4 layers each, 257k vocabulary), "
        "96 px; ki_vla only (pi05 and pi0_fast build only at their real widths)",
        ki_variant="tiny",
    ),
}


def patch_depth(depth: int | None, mlp_divisor: int = 1) -> None:
    """Fewer layers of the real widths in all three policies, SigLIP included. LeRobot's pi05/pi0_fast only
    know the real sizes: for this process we replace their `get_gemma_config` and the PaliGemma config
    class they instantiate (SigLIP's depth comes from its defaults), never their files."""
    if depth is None:
        return
    for module in (modeling_pi05, modeling_pi0_fast):
        real = module.get_gemma_config

        def shallow(name, _real=real, _cls=module.GemmaConfig):
            cfg = _real(name)
            mlp = cfg.mlp_dim // mlp_divisor
            return _cls(cfg.width, depth, mlp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

        module.get_gemma_config = shallow
    base = CONFIG_MAPPING["paligemma"]

    class ShallowSiglipPaliGemmaConfig(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.vision_config.num_hidden_layers = depth

    CONFIG_MAPPING.register("paligemma", ShallowSiglipPaliGemmaConfig, exist_ok=True)
    for table in (variants.BACKBONE_VARIANTS, variants.EXPERT_VARIANTS):
        for name in set(table) & {"gemma_2b", "gemma_300m"}:
            mlp = table[name].mlp_dim // mlp_divisor
            table[name] = variants.GemmaSize(**{**vars(table[name]), "depth": depth, "mlp_dim": mlp})
    for name in ("gemma_2b", "gemma_300m"):
        variants.VISION_VARIANTS[name] = variants.SiglipSize(
            **{**vars(variants.VISION_VARIANTS[name]), "num_layers": depth}
        )


class _LocalTokenizers:
    """Offline stand-ins for the two tokenizers pi0_fast's constructor downloads. Inference timing only
    needs the BOS id and an end-of-action id (-1: never produced, so decoding runs `--fast-tokens` steps)."""

    bos_token_id = 2
    vocab_size = 257_152

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def convert_tokens_to_ids(self, token: str) -> int:
        return -1


def _features(cfg, n_cams: int, res: int):
    cfg.input_features = {cam: PolicyFeature(FeatureType.VISUAL, (3, res, res)) for cam in CAMERAS[:n_cams]}
    cfg.input_features[OBS_STATE] = PolicyFeature(FeatureType.STATE, (STATE_DIM,))
    cfg.output_features = {ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))}
    return cfg


def build(name: str, size: Size, dtype: str, device: str, **overrides):
    common = dict(
        image_resolution=(size.resolution, size.resolution),
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        dtype=dtype,
        device=device,
    )
    if name == "ki_vla":
        # The budget the measurements were taken with (no dataset here to size it from).
        overrides = {"max_fast_tokens": DEFAULT_MAX_FAST_TOKENS, **overrides}
        if size.ki_variant is not None:
            overrides = {
                "paligemma_variant": size.ki_variant,
                "action_expert_variant": size.ki_variant,
                **overrides,
            }
        cfg = KIConfig(text_tokenizer=PALIGEMMA_TOKENIZER, **common, **overrides)
        cls = KIPolicy
    elif name == "pi05":  # overrides: e.g. compile_model=True, LeRobot's own torch.compile of pi05
        cfg, cls = PI05Config(**common, **overrides), modeling_pi05.PI05Policy
    else:
        modeling_pi0_fast.AutoProcessor = modeling_pi0_fast.AutoTokenizer = _LocalTokenizers
        cfg, cls = PI0FastConfig(**common), modeling_pi0_fast.PI0FastPolicy
    _features(cfg, 3, size.resolution)
    with torch.device(device):  # built on the device: no 4B-parameter copy from the host
        policy = cls(cfg)
    if size.frozen_embeddings:
        paligemma = policy.model.paligemma_with_expert.paligemma
        for mod in (
            paligemma.lm_head,
            paligemma.model.language_model.embed_tokens,
            paligemma.model.vision_tower,
        ):
            mod.requires_grad_(False)
    return policy


def use_cameras(policy, n_cams: int, res: int) -> None:
    _features(policy.config, n_cams, res)


def make_batch(name: str, policy, bsz: int, n_cams: int, res: int, fast_tokens: int, device: str) -> dict:
    g = torch.Generator().manual_seed(bsz * 10 + n_cams)
    batch = {cam: torch.rand(bsz, 3, res, res, generator=g) for cam in CAMERAS[:n_cams]}
    batch[OBS_STATE] = torch.rand(bsz, STATE_DIM, generator=g) * 2 - 1
    ids = torch.randint(3, 200_000, (bsz, PROMPT_LEN), generator=g)
    mask = torch.zeros(bsz, PROMPT_LEN, dtype=torch.bool)
    mask[:, :PROMPT_VALID] = True
    ids[~mask] = 0
    batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK] = ids, mask
    batch[ACTION] = torch.rand(bsz, CHUNK, ACTION_DIM, generator=g) * 2 - 1
    batch[f"{ACTION}_is_pad"] = torch.zeros(bsz, CHUNK, dtype=torch.bool)
    if name == "ki_vla":
        lo, hi = policy.model.layout.fast_lm_range()
        n_slots = policy.config.max_fast_tokens
    else:  # pi0_fast's processor pads the FAST ids to max_action_tokens
        lo, hi = 257_152 - 128 - 2048, 257_152 - 128
        n_slots = getattr(policy.config, "max_action_tokens", 0)
    if n_slots:
        fast = torch.randint(lo, hi, (bsz, n_slots), generator=g)
        fmask = torch.zeros(bsz, n_slots, dtype=torch.bool)
        fmask[:, : fast_tokens + 1] = True  # + the end-of-action token
        batch[ACTION_TOKENS], batch[ACTION_TOKEN_MASK] = fast, fmask
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: resets VmHWM (the peak resident set) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM")]
    return int(hwm[0].split()[1]) / 2**20 if hwm else float("nan")


def inference_fn(name: str, policy, batch: dict, fast_tokens: int) -> Callable[[], torch.Tensor]:
    if name != "pi0_fast":
        return lambda: policy.predict_action_chunk(batch)

    def decode() -> torch.Tensor:
        images, img_masks = policy._preprocess_images(batch)
        return policy.model.sample_actions_fast_kv_cache(
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            max_decoding_steps=fast_tokens,
            temperature=0.0,
        )

    return torch.no_grad()(decode)


def train_step_fn(policy, batch: dict) -> Callable[[], None]:
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=params[0].is_cuda)

    def step() -> None:
        loss, _ = policy.forward(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)  # fast path vs eager, relative error

    def add(self, **row) -> None:
        self.rows.append(row)
        print(
            "  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )

    def get(self, policy: str, kind: str, key) -> dict | None:
        return next(
            (r for r in self.rows if r["policy"] == policy and r["kind"] == kind and r["key"] == key), None
        )


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_policy(name, label, args, size, res: Results, inference=True, train=True, **overrides) -> None:
    print(f"== {label}", flush=True)
    policy = build(name, size, args.dtype, args.device, **overrides)
    if inference:
        policy.eval()
        for n_cams in args.cameras:
            use_cameras(policy, n_cams, size.resolution)
            batch = make_batch(name, policy, 1, n_cams, size.resolution, args.fast_tokens, args.device)
            with torch.no_grad():
                fn = inference_fn(name, policy, batch, args.fast_tokens)
                first, _ = median_ms(fn, args.device, 0, 1)  # the first call: capture / compile cost
                med, times = median_ms(fn, args.device, args.warmup, args.repeats)
            res.add(
                policy=label, kind="infer", key=n_cams, ms=med, spread=max(times) - min(times), first_ms=first
            )
        if name == "ki_vla" and args.device == "cuda" and policy.config.cuda_graphs:
            res.checks[label] = check_graph_against_eager(policy, size, args)
    if train:
        use_cameras(policy, args.train_cameras, size.resolution)
        policy.train()
        for bsz in args.train_batches:
            batch = make_batch(
                name, policy, bsz, args.train_cameras, size.resolution, args.fast_tokens, args.device
            )
            label_b = label
            for attempt in ("plain", "checkpointing"):
                try:
                    step = train_step_fn(policy, batch)
                    reset_peak(args.device)
                    med, times = median_ms(step, args.device, args.train_warmup, args.train_repeats)
                    res.add(
                        policy=label_b,
                        kind="train",
                        key=bsz,
                        ms=med,
                        spread=max(times) - min(times),
                        peak_gib=peak_gib(args.device),
                    )
                    break
                except torch.OutOfMemoryError:
                    step = None
                    policy.zero_grad(set_to_none=True)
                    free(args.device)
                    if attempt == "checkpointing":
                        res.add(
                            policy=label_b,
                            kind="train",
                            key=bsz,
                            ms=float("nan"),
                            spread=0.0,
                            peak_gib=float("inf"),
                        )
                    else:  # all three policies offer gradient checkpointing; say that it was needed
                        print(f"  batch {bsz}: out of memory; again with gradient checkpointing", flush=True)
                        policy.model.gradient_checkpointing_enable()
                        res.add(policy=label_b, kind="note", key=bsz, ms=float("nan"), spread=0.0)
            if getattr(policy.model, "gradient_checkpointing_enabled", False):
                policy.model.gradient_checkpointing_disable()
            del batch
            step = None
            free(args.device)
    del policy
    free(args.device)


# Issue 17's optimisations (lerobot_ki.transformer.FastPaths), each on its own, then all: the new default.
FAST_PATH_VARIANTS = [
    ("today (issue 17 off)", {"all": False}),
    ("+ step plan only", {"all": False, "step_plan": True}),
    ("+ fused QKV only (off by default)", {"all": False, "fused_qkv": True}),
    ("+ fused gate/up only (off by default)", {"all": False, "fused_gate_up": True}),
    ("+ batched SigLIP only", {"all": False, "batched_vision": True}),
    ("new default", {}),
]
TODAY, NEW = FAST_PATH_VARIANTS[0][0], FAST_PATH_VARIANTS[-1][0]


def run_fast_paths(name: str, label: str, args, size: Size, res: Results) -> None:
    """One ki_vla policy (the default config: the CUDA graph on CUDA, eager on CPU), every variant timed
    in turns, call by call, so a shared machine's load falls on all alike; each variant keeps its own
    CUDA graphs. Then each variant's chunk against today's from the same noise (`check_fast_paths`)."""
    print(f"== {label} optimisations (taking turns)", flush=True)
    policy = build(name, size, args.dtype, args.device).eval()
    graphs: dict[str, object] = {}

    def call(variant: str, flags: dict, batch: dict) -> None:
        policy._graphed = graphs.get(variant)
        with fast_paths(**flags), torch.no_grad():
            policy.predict_action_chunk(batch)
        graphs[variant] = policy._graphed

    for n_cams in args.cameras:
        use_cameras(policy, n_cams, size.resolution)
        batch = make_batch("ki_vla", policy, 1, n_cams, size.resolution, args.fast_tokens, args.device)
        # Each variant's first call alone (eager warm-up + CUDA-graph capture): one that fails is reported
        # and left out, so that it cannot cost the other variants' figures.
        live, first = [], {}
        for variant, flags in FAST_PATH_VARIANTS:
            try:
                once = functools.partial(call, variant, flags, batch)
                first[variant], _ = median_ms(once, args.device, 0, 1)
                live.append((variant, flags))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                print(f"!! ki_vla, {variant}, {n_cams} cameras failed: {type(e).__name__}: {e}", flush=True)
                graphs.pop(variant, None)
                free(args.device)
        times: dict[str, list[float]] = {variant: [] for variant, _ in live}
        for _ in range(args.warmup):
            for variant, flags in live:
                call(variant, flags, batch)
        for _ in range(args.repeats):
            for variant, flags in live:
                sync(args.device)
                t0 = time.perf_counter()
                call(variant, flags, batch)
                sync(args.device)
                times[variant].append((time.perf_counter() - t0) * 1e3)
        for variant, _ in live:
            t = times[variant]
            res.add(
                policy=f"ki_vla, {variant}",
                kind="infer",
                key=n_cams,
                ms=statistics.median(t),
                spread=max(t) - min(t),
                first_ms=first[variant],
            )
    graphs.clear()
    policy._graphed = None
    check_fast_paths(policy, size, args, res)
    # No training rows: with gradients on, every flag runs today's path (tests/test_fast_paths.py).
    free(args.device)


def check_fast_paths(policy, size: Size, args, res: Results) -> None:
    """Each variant's chunk (2 cameras, same noise) against today's path, on the default sampler (the
    CUDA graph on CUDA). Relative error ||new - today|| / ||today||; float32 must agree to 1e-5 (the
    reordered float rounding of batched and fused matmuls), bf16 to 2e-2."""
    use_cameras(policy, 2, size.resolution)
    batch = make_batch("ki_vla", policy, 1, 2, size.resolution, args.fast_tokens, args.device)
    noise = torch.randn(1, CHUNK, policy.config.max_action_dim, device=args.device)
    with torch.no_grad():  # adaRMS denses start at zero: the flow time would not reach the chunk
        for module in policy.model.paligemma_with_expert.expert_model.modules():
            if isinstance(getattr(module, "dense", None), torch.nn.Linear):
                module.dense.weight.normal_(0.0, 0.02)
    chunks = {}
    for label, flags in FAST_PATH_VARIANTS:
        policy._graphed = None
        try:
            with fast_paths(**flags), torch.no_grad():
                chunks[label] = policy.predict_action_chunk(batch, noise=noise.clone())
        except Exception as e:  # noqa: BLE001  (reported; the others are still checked)
            print(f"!! {label}: no chunk to check: {type(e).__name__}: {e}", flush=True)
    policy._graphed = None
    bound = 1e-5 if args.dtype == "float32" else 2e-2
    bad = []
    for label, chunk in chunks.items():
        err = ((chunk - chunks[TODAY]).norm() / chunks[TODAY].norm()).item()
        print(f"  {label} vs today: relative error {err:.2e}", flush=True)
        res.checks[f"ki_vla, {label} vs today"] = err
        if not err <= bound:
            bad.append(f"{label} differs from today's sampler (relative error {err:.3g} > {bound})")
    if policy.config.cuda_graphs and args.device == "cuda":  # the new default's replay against its eager run
        try:
            with fast_paths():
                res.checks[f"ki_vla, {NEW} (CUDA graph)"] = check_graph_against_eager(policy, size, args)
        except RuntimeError as e:
            bad.append(str(e))
    if bad:
        raise RuntimeError("; ".join(bad))


def check_graph_against_eager(policy, size: Size, args) -> float:
    """The fast path (CUDA graph, compiled expert if on) must compute what the plain eager sampler
    computes from the same noise: identical kernels give 0; a compiled expert fuses bf16 arithmetic
    differently, so it is held to a looser bound."""
    use_cameras(policy, 2, size.resolution)
    batch = make_batch("ki_vla", policy, 1, 2, size.resolution, args.fast_tokens, args.device)
    noise = torch.randn(1, CHUNK, policy.config.max_action_dim, device=args.device)
    cfg = policy.config
    compiled = cfg.compile_expert
    policy._graphed = None  # capture under the caller's flags, not reuse a graph recorded under others
    with torch.no_grad():
        fast = policy.predict_action_chunk(batch, noise=noise.clone())
        cfg.cuda_graphs, cfg.compile_expert = False, False
        eager = policy.predict_action_chunk(batch, noise=noise.clone())
        cfg.cuda_graphs, cfg.compile_expert = True, compiled
    err = ((fast - eager).norm() / eager.norm()).item()
    print(f"  fast path vs eager: relative error {err:.2e}", flush=True)
    if not err < (3e-2 if compiled else 1e-3):
        raise RuntimeError(f"The fast path differs from the eager path (relative error {err:.3g})")
    return err


def table(res: Results, args, size: Size) -> str:
    peers = ("pi05", "pi0_fast")
    lines = [
        f"device: {args.device_name}; dtype {args.dtype}; {size.note}; date {date.today()}",
        f"command: {' '.join(sys.argv)}",
        "",
        "| inference, batch 1 | "
        + " | ".join(f"{c} cam ms" for c in args.cameras)
        + " | "
        + " | ".join(f"{c} cam ratio to pi05 / pi0_fast" for c in args.cameras)
        + " |",
        "|---" * (1 + 2 * len(args.cameras)) + "|",
    ]
    labels = list(dict.fromkeys(r["policy"] for r in res.rows))
    for label in labels:
        cells, ratios = [], []
        for c in args.cameras:
            r = res.get(label, "infer", c)
            cells.append(f"{r['ms']:.1f}" if r else "-")
            refs = [res.get(p, "infer", c) for p in peers]
            ratios.append(" / ".join(f"{r['ms'] / ref['ms']:.2f}x" if r and ref else "-" for ref in refs))
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += [
        "",
        f"| training step, {args.train_cameras} cameras | "
        + " | ".join(
            f"batch {b} ms | batch {b} peak GiB | batch {b} ratio to pi05" for b in args.train_batches
        )
        + " |",
        "|---" * (1 + 3 * len(args.train_batches)) + "|",
    ]
    for label in labels:
        cells = []
        for b in args.train_batches:
            r, ref = res.get(label, "train", b), res.get("pi05", "train", b)
            if r is None:
                cells += ["-", "-", "-"]
                continue
            ratio = f"{r['ms'] / ref['ms']:.2f}x" if ref and ref["ms"] == ref["ms"] else "-"
            ckpt = " (grad. ckpt)" if res.get(label, "note", b) else ""
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "-"  # nan: not measured
            cells += [f"{r['ms']:.0f}{ckpt}" if r["ms"] == r["ms"] else "OOM", peak, ratio]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [""] + [
        f"{label}: chunk relative error {e:.1e}"
        if label.endswith("vs today")
        else f"{label}: chunk vs the eager sampler, relative error {e:.1e}"
        for label, e in res.checks.items()
    ]
    speedups = []
    for c in args.cameras:
        today, new = res.get(f"ki_vla, {TODAY}", "infer", c), res.get(f"ki_vla, {NEW}", "infer", c)
        if today and new:
            speedups.append(f"{c} cam {today['ms'] / new['ms']:.2f}x")
    if speedups:
        lines.append("ki_vla, new default vs today, same run (today ms / new ms): " + ", ".join(speedups))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--cameras", default="1,2,3")
    ap.add_argument("--train-batches", default=None, help="default: 8,32 on cuda, 8 on cpu")
    ap.add_argument("--train-cameras", type=int, default=2)
    ap.add_argument("--fast-tokens", type=int, default=50, help="tokens pi0_fast decodes per chunk")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--train-warmup", type=int, default=None)
    ap.add_argument("--train-repeats", type=int, default=None)
    ap.add_argument(
        "--policies",
        default="ki_vla,pi05,pi0_fast",
        help="any of ki_vla, pi05, pi0_fast, pi05_compiled (pi05 with LeRobot's compile_model=true)",
    )
    ap.add_argument(
        "--ki-variants",
        default="all",
        choices=("all", "final", "issue17", "compiled"),
        help="ki_vla rows: 'all' the optimisation steps (with issue 17's each on its own), 'final' the "
        "default only, 'issue17' issue 17's optimisations only, 'compiled' the default with the compiled "
        "expert in each compile mode (GPU; the first call's compile time is in the JSON as first_ms)",
    )
    ap.add_argument(
        "--compile-modes",
        default=",".join(EXPERT_COMPILE_MODES),
        help="with --ki-variants compiled: the torch.compile modes of the expert, comma-separated",
    )
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.cameras = [int(c) for c in args.cameras.split(",")]
    args.train_batches = args.train_batches or ("8,32" if gpu else "8")
    args.train_batches = [] if args.no_train else [int(b) for b in args.train_batches.split(",")]
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if gpu else 3)
    args.train_warmup = args.train_warmup if args.train_warmup is not None else (2 if gpu else 1)
    args.train_repeats = args.train_repeats if args.train_repeats is not None else (5 if gpu else 2)
    args.device_name = torch.cuda.get_device_name() if gpu else f"CPU {platform.processor() or 'x86_64'}"
    if not gpu:
        args.device_name += f", {torch.get_num_threads()} threads"
    size = SIZES[args.size]
    patch_depth(size.depth, size.mlp_divisor)
    torch.manual_seed(0)
    res = Results()
    wanted = args.policies.split(",")
    real_trim = model_inputs.trim_prompt_padding
    if size.ki_variant is not None and wanted != ["ki_vla"]:
        print(f"--size {args.size} builds ki_vla only: pass --policies ki_vla", file=sys.stderr)
        sys.exit(2)
    if "ki_vla" in wanted and args.ki_variants in ("all", "issue17"):
        guarded(run_fast_paths, "ki_vla", "ki_vla, issue 17", args, size, res)
    if "ki_vla" in wanted and args.ki_variants == "compiled":
        for mode in args.compile_modes.split(","):
            label = f"ki_vla, new default + compiled expert ({mode})"
            guarded(
                run_policy,
                "ki_vla",
                label,
                args,
                size,
                res,
                train=False,
                compile_expert=True,
                compile_mode=mode,
            )
    if "ki_vla" in wanted and args.ki_variants not in ("issue17", "compiled"):
        steps = [("ki_vla", {}, {})]
        if args.ki_variants == "all":
            # Each optimisation measured on its own, in the order they were made.
            base = {"cuda_graphs": False, "vision_autocast": False}
            steps = [
                ("ki_vla (eager, full prompt padding)", base, {"trim": False}),
                ("ki_vla (eager, prompt padding trimmed)", base, {}),
            ]
            if gpu:
                steps += [
                    ("ki_vla (+ bf16 autocast SigLIP)", {"cuda_graphs": False}, {}),
                    ("ki_vla (+ CUDA graph)", {}, {"train": False}),
                    ("ki_vla (+ compiled expert)", {"compile_expert": True}, {"train": False}),
                ]
        for label, overrides, opts in steps:
            model_inputs.trim_prompt_padding = real_trim if opts.get("trim", True) else _no_trim
            train = bool(args.train_batches) and opts.get("train", True)
            # The earlier steps as they were made: before issue 17's paths (measured above on their own).
            with fast_paths(all=args.ki_variants == "final"):
                guarded(run_policy, "ki_vla", label, args, size, res, train=train, **overrides)
        model_inputs.trim_prompt_padding = real_trim
        if args.ki_variants == "all" and args.train_batches:
            guarded(
                run_policy,
                "ki_vla",
                "ki_vla (4 flow samples per backbone pass)",
                args,
                size,
                res,
                inference=False,
                flow_samples_per_backbone_pass=4,
            )
    for name in ("pi05", "pi0_fast"):
        if name in wanted:
            guarded(run_policy, name, name, args, size, res, train=bool(args.train_batches))
    if "pi05_compiled" in wanted:  # LeRobot's own option, in its default mode (max-autotune); inference only
        label = f"pi05 (compile_model=true, {PI05Config.compile_mode})"
        guarded(run_policy, "pi05", label, args, size, res, train=False, compile_model=True)
    print()
    print(table(res, args, size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": res.rows}, f, indent=1)


def guarded(fn, name, label, args, *rest, **kwargs) -> None:
    """One policy failing (a capture error, say) must not cost the other measurements of a GPU lease."""
    try:
        fn(name, label, args, *rest, **kwargs)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"!! {label} failed: {type(e).__name__}: {e}", flush=True)
        free(args.device)


def _no_trim(tokens: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens, masks.bool()


if __name__ == "__main__":
    main()
