"""One decoder stack forward for both towers, with explicit masks and per-layer K/V.

The backbone and the expert are both Gemma stacks (LeRobot's `PiGemmaModel`). Knowledge insulation needs
one thing transformers' forward does not give: the expert's queries must attend to the backbone's
keys/values of the image+prompt positions, *detached*, while the backbone never sees the expert. So the
backbone runs first and returns its per-layer K/V; the expert then runs with those K/V as its "past".
The same function decodes autoregressively (past = KV cache) and serves both towers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.pi_gemma import _gated_residual
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

KV = tuple[Tensor, Tensor]  # (B, KVH, L, hd) keys and values, RoPE applied


@dataclass(frozen=True)
class FastPaths:
    """The inference optimisations of issue 17, switchable (`fast_paths(...)`) so that the benchmark and
    the tests run today's path next to the new one in the same process. On by default where they measured
    at least as fast on our CPU (README, "Speed and memory"); the GPU figures are still to be measured.

    - `step_plan`: the expert's step-independent work (time embedding, every adaRMS modulation for all
      Euler steps in one matmul per norm, the attention mask, RoPE) done once per sampler call.
    - `fused_qkv`: Q/K/V as one matmul, from weights concatenated once and cached (no-grad calls only;
      parameters and state-dict keys unchanged, see `fused_weight`). Off: on the CPU the matmul saved is
      paid back by the strided q/k/v that RoPE, the K/V concatenation and SDPA then read (tiny expert
      step 0.93x, prefill 1.04x); a candidate for the GPU, where launches, not memory order, dominate.
    - `fused_gate_up`: the MLP's gate and up projections likewise. Off for the same reason: the
      activation reads a strided half of the fused output (CPU MLP 0.93-0.998x).
    - `batched_vision`: SigLIP over all cameras as one batch (B * cameras) instead of camera by camera
      (no-grad calls only).

    Training (gradients on) runs today's path whatever the flags: its numbers do not change.
    """

    step_plan: bool = True
    fused_qkv: bool = False
    fused_gate_up: bool = False
    batched_vision: bool = True


FAST_PATHS = FastPaths()


def active_fast_paths() -> FastPaths:
    """The flags in force now (read at call time: `fast_paths` swaps them)."""
    return FAST_PATHS


@contextlib.contextmanager
def fast_paths(**flags: bool) -> Iterator[FastPaths]:
    """Switch optimisations for the duration of a block (`with fast_paths(step_plan=False): ...`);
    `fast_paths(all=False)` turns every one off (today's path)."""
    global FAST_PATHS  # noqa: PLW0603 - a process-wide switch read at call time
    before = FAST_PATHS
    if "all" in flags:
        value = flags.pop("all")
        flags = {f.name: value for f in fields(FastPaths)} | flags
    FAST_PATHS = replace(before, **flags)
    try:
        yield FAST_PATHS
    finally:
        FAST_PATHS = before


def fused_weight(owner: nn.Module, linears: Sequence[nn.Linear]) -> Tensor:
    """The weights of `linears` (same input, no bias) concatenated along their outputs, for one matmul in
    place of several. Cached on `owner` (a plain attribute: never a parameter, never in the state dict)
    and rebuilt when a source weight changes: new storage (`.to()`, loading by assignment) or an in-place
    update (an optimizer step, `load_state_dict`'s copy), seen through the tensors' version counters.
    A rebuild of the same shape is written into the old cache, so its address does not move: a CUDA graph
    that recorded it reads the new values (`cuda_graphs.GraphedSampler` refreshes it before each replay)."""
    key = tuple((lin.weight.data_ptr(), lin.weight._version) for lin in linears)  # noqa: SLF001
    cached = owner.__dict__.get("_ki_fused_weight")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        old = None if cached is None else cached[1]
        if (
            old is not None
            and old.shape == weight.shape
            and old.dtype == weight.dtype
            and old.device == weight.device
            and not old.is_inference()
        ):
            weight = old.copy_(weight)
    owner.__dict__["_ki_fused_weight"] = (key, weight, tuple(linears))
    return weight


def refresh_fused_weights(model: nn.Module) -> tuple[int, ...]:
    """Brings every fused-weight cache under `model` up to date with its source weights (in place where
    it can) and returns their addresses: what a recorded CUDA graph reads, so a change of address must
    trigger a new recording (`cuda_graphs.GraphedSampler`)."""
    addresses = []
    for module in model.modules():
        cached = module.__dict__.get("_ki_fused_weight")
        if cached is not None:
            addresses.append(fused_weight(module, cached[2]).data_ptr())
    return tuple(addresses)


def fusable(linears: Sequence[nn.Linear]) -> bool:
    return all(lin.bias is None for lin in linears)


def fused_sources(stack: nn.Module) -> list[tuple[nn.Module, tuple[nn.Linear, ...]]]:
    """(owner, linears) of every fused projection of a Gemma stack: each layer's Q/K/V and gate/up."""
    out = []
    for layer in stack.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out.append((attn, (attn.q_proj, attn.k_proj, attn.v_proj)))
        out.append((mlp, (mlp.gate_proj, mlp.up_proj)))
    return out


def _use_fused(flag: bool) -> bool:
    # Training needs gradients to the separate parameters; the cache is a detached copy.
    return flag and not torch.is_grad_enabled()


def _qkv(attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Lq, H*hd), (B, Lq, KVH*hd) x 2."""
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    if _use_fused(FAST_PATHS.fused_qkv) and fusable(linears):
        qkv = F.linear(h, fused_weight(attn, linears))
        return qkv.split([lin.out_features for lin in linears], dim=-1)
    return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)


def _mlp(mlp: nn.Module, h: Tensor) -> Tensor:
    """Gemma's MLP, down(act(gate(h)) * up(h)), with gate and up as one matmul on the fused path."""
    linears = (mlp.gate_proj, mlp.up_proj)
    if _use_fused(FAST_PATHS.fused_gate_up) and fusable(linears):
        gate, up = F.linear(h, fused_weight(mlp, linears)).split([lin.out_features for lin in linears], -1)
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return mlp(h)


@dataclass(frozen=True)
class PrefixCond:
    """The per-token adaRMS condition of training-time RTC, where each sample's tokens have one of two flow
    times: time 0 on the committed positions `committed` (B, L) bool, the sample's time on the rest.
    `both` (2B, Dc) holds the per-sample conditions, the sample times' first, then time 0's. Kept as
    per-sample rows and a mask rather than a (B, L, Dc) tensor: each norm's modulation dense (Dc -> 3D)
    runs on 2B rows, not B*L (at the real size, Dc = D = 1024, B*L rows would add ~40% to the expert's
    FLOPs per token)."""

    both: Tensor
    committed: Tensor


@dataclass(frozen=True)
class Modulation:
    """One adaRMS norm's modulation computed ahead of the step that uses it (see `plan_modulations`):
    `norm.dense(cond)` split into 1 + scale and shift (float32, as the norm applies them) and the gate
    (in the stack's dtype), each (B, D); with `committed` (B, L) (training-time RTC) (2B, D), the rows
    [the step's time; time 0] picked per token as `ada_norm` picks them for a `PrefixCond`."""

    scale1: Tensor
    shift: Tensor
    gate: Tensor
    committed: Tensor | None = None


Cond = Tensor | PrefixCond | Modulation | None


def ada_norm(norm: nn.Module, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor | None]:
    """LeRobot's `PiGemmaRMSNorm` (adaRMS) with a per-sample condition (B, Dc), as pi05 uses it, or a
    `PrefixCond`. For the latter this is that norm's forward with the modulation picked per token (its
    own `_norm` and `dense`, its formula): one dense call and one select per norm. Calling the norm once
    per condition and selecting the outputs reuses more of it but doubles the elementwise work, which
    made the tiny expert's step 22% slower on a CPU (launch-bound). A `Modulation` is the same formula
    with the dense (and 1 + scale) already applied. Returns (normed (B, L, D), gate)."""
    if isinstance(cond, Modulation):
        scale1, shift, gate = cond.scale1, cond.shift, cond.gate
        if cond.committed is None:
            scale1, shift, gate = scale1[:, None], shift[:, None], gate[:, None]  # (B, 1, D)
        else:
            pick = cond.committed[:, :, None]  # (B, L, 1): time 0's rows (the second half) where committed
            scale1, shift, gate = (_per_token(pick, t) for t in (scale1, shift, gate))  # (B, L, D)
        normed = norm._norm(x) * scale1 + shift
        return normed.to(x.dtype), gate
    if not isinstance(cond, PrefixCond):
        return norm(x, cond=cond)
    noisy, clean = norm.dense(cond.both).chunk(2)  # (B, 3D) each
    modulation = torch.where(cond.committed[:, :, None], clean[:, None], noisy[:, None])  # (B, L, 3D)
    scale, shift, gate = modulation.chunk(3, dim=-1)
    normed = norm._norm(x) * (1 + scale.float()) + shift.float()
    return normed.to(x.dtype), gate.to(x.dtype)


def _per_token(pick: Tensor, rows: Tensor) -> Tensor:
    noisy, clean = rows.chunk(2)  # (B, D) each: the step's time, time 0
    return torch.where(pick, clean[:, None], noisy[:, None])


def adaptive_norms(stack: nn.Module) -> list[nn.Module]:
    """The adaRMS norms of a stack in the order `run_stack` applies them: per layer input and
    post-attention, then the final norm."""
    norms = [n for layer in stack.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return [*norms, stack.norm]


def plan_modulations(
    stack: nn.Module,
    conds: Tensor,  # (S * R, Dc): the conditions of S steps, R rows each (B, or 2B with `committed`)
    n_steps: int,
    committed: Tensor | None = None,  # (B, L) bool, training-time RTC
) -> list[list[Modulation]]:
    """Every adaRMS modulation of S expert calls whose conditions are known ahead (the fixed Euler
    schedule): one dense matmul per norm over all S steps' rows instead of one per norm per step.
    Returns, per step, the per-norm `Modulation`s in `adaptive_norms` order (row views, no copies)."""
    dtype = stack.layers[0].self_attn.q_proj.weight.dtype
    per_norm = []
    for norm in adaptive_norms(stack):
        scale, shift, gate = norm.dense(conds).chunk(3, dim=-1)  # (S * R, D) each
        per_norm.append(
            ((1 + scale.float()).chunk(n_steps), shift.float().chunk(n_steps), gate.to(dtype).chunk(n_steps))
        )
    return [
        [Modulation(scale1[k], shift[k], gate[k], committed) for scale1, shift, gate in per_norm]
        for k in range(n_steps)
    ]


@dataclass(frozen=True)
class Geometry:
    """What a stack call needs that depends only on the positions and the mask, not on the activations:
    the SDPA mask (B, 1, Lq, Lpast + Lq) and RoPE cos/sin (B, Lq, hd). The expert's 10 Euler steps share
    one (`make_geometry` once per sampler call)."""

    mask: Tensor
    cos: Tensor
    sin: Tensor


def make_geometry(model: nn.Module, positions: Tensor, mask: Tensor, dtype: torch.dtype) -> Geometry:
    """`mask` (B, Lq, Lpast + Lq) bool, True = may attend; `positions` (B, Lq). The mask becomes SDPA's
    float form (0 / -inf), which is what SDPA turns a bool mask into on every call."""
    # A query row with nothing to attend to (a padding token) would give NaN in SDPA: let it see itself.
    lpast = mask.shape[-1] - mask.shape[-2]
    eye = torch.eye(mask.shape[-2], dtype=torch.bool, device=mask.device)
    mask = mask.clone()
    mask[..., lpast:] |= eye
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    cos, sin = model.rotary_emb(additive, positions)
    return Geometry(additive[:, None], cos.to(dtype), sin.to(dtype))


def _layer(
    layer: nn.Module,
    x: Tensor,  # (B, Lq, D)
    geometry: Geometry,
    past_k: Tensor | None,
    past_v: Tensor | None,
    cond: tuple[Cond, Cond],  # adaRMS conditions of the input and post-attention norms (expert only)
    detach_past: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    attn = layer.self_attn
    bsz, lq, _ = x.shape
    h, gate = ada_norm(layer.input_layernorm, x, cond[0])
    q, k, v = _qkv(attn, h.to(attn.q_proj.weight.dtype))
    q = q.view(bsz, lq, -1, attn.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
    k = k.view(bsz, lq, -1, attn.head_dim).transpose(1, 2)  # (B, KVH, Lq, hd)
    v = v.view(bsz, lq, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, geometry.cos, geometry.sin)
    if past_k is not None:
        # Stop-gradient: sg(K_b), sg(V_b). The reader learns from them; the writer is not updated.
        pk, pv = (past_k.detach(), past_v.detach()) if detach_past else (past_k, past_v)
        k_all, v_all = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
    else:
        k_all, v_all = k, v
    out = F.scaled_dot_product_attention(
        q, k_all, v_all, attn_mask=geometry.mask, scale=attn.scaling, enable_gqa=True
    )  # (B, H, Lq, hd)
    out = attn.o_proj(out.transpose(1, 2).reshape(bsz, lq, -1))
    x = _gated_residual(x, out.to(x.dtype), gate)
    h, gate = ada_norm(layer.post_attention_layernorm, x, cond[1])
    h = _mlp(layer.mlp, h.to(layer.mlp.up_proj.weight.dtype))
    x = _gated_residual(x, h.to(x.dtype), gate)
    return x, k_all, v_all


class KIDecoderLayer(nn.Module):
    """A decoder layer of either tower as ki_vla runs it: its forward is `_layer`. Never built directly:
    `adopt_layers` gives this class to the layers LeRobot's towers built (attributes, submodules and
    state-dict keys unchanged).

    LeRobot's `pi_gemma` makes the decoder-layer class inside a factory, once per tower: both towers' layers
    are called `_PiGemmaDecoderLayerBase` but are two classes, and their stock forward is one ki_vla never
    calls. With one class of ours, (1) the stacks call each layer as a module, so a wrapper around it sees
    every use of its weights: an FSDP unit gathers its shards in the layer's forward, where reaching into
    its submodules from outside found empty shards; (2) one name in `KIPolicy._no_split_modules` covers
    both towers, where FSDP's wrap policy, which looks classes up by name, found the backbone's only."""

    forward = _layer


def adopt_layers(stack: nn.Module) -> None:
    for layer in stack.layers:
        layer.__class__ = KIDecoderLayer


def run_stack(
    model: nn.Module,  # PiGemmaModel
    x: Tensor,  # (B, Lq, D) input embeddings
    positions: Tensor | None,  # (B, Lq) RoPE positions (None with `geometry`)
    mask: Tensor | None,  # (B, Lq, Lpast + Lq) bool (None with `geometry`)
    past: list[KV] | None = None,  # per layer, (B, KVH, Lpast, hd)
    cond: Cond | list[Modulation] = None,  # adaRMS condition (expert), per norm if planned; None: backbone
    detach_past: bool = False,
    use_checkpoint: bool = False,
    geometry: Geometry | None = None,  # made from positions and mask if not given
) -> tuple[Tensor, list[KV]]:
    """Returns the final-norm hidden states (B, Lq, D) and per-layer K/V over past + these positions."""
    x = x.to(model.layers[0].self_attn.q_proj.weight.dtype)
    if geometry is None:
        geometry = make_geometry(model, positions, mask, x.dtype)
    conds = cond if isinstance(cond, list) else [cond] * (2 * len(model.layers) + 1)
    kvs: list[KV] = []
    for i, layer in enumerate(model.layers):
        pk, pv = past[i] if past is not None else (None, None)
        layer_cond = (conds[2 * i], conds[2 * i + 1])
        if use_checkpoint and torch.is_grad_enabled():
            x, k, v = checkpoint(layer, x, geometry, pk, pv, layer_cond, detach_past, use_reentrant=False)
        else:
            x, k, v = layer(x, geometry, pk, pv, layer_cond, detach_past)
        kvs.append((k, v))
    x, _ = ada_norm(model.norm, x, conds[-1])
    return x, kvs
