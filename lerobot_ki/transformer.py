"""One decoder stack forward for both towers, with explicit masks and per-layer K/V.

The backbone and the expert are both Gemma stacks (LeRobot's `PiGemmaModel`). Knowledge insulation needs
one thing transformers' forward does not give: the expert's queries must attend to the backbone's
keys/values of the image+prompt positions, *detached*, while the backbone never sees the expert. So the
backbone runs first and returns its per-layer K/V; the expert then runs with those K/V as its "past".
The same function decodes autoregressively (past = KV cache) and serves both towers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.pi_gemma import _gated_residual
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

KV = tuple[Tensor, Tensor]  # (B, KVH, L, hd) keys and values, RoPE applied


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


def ada_norm(norm: nn.Module, x: Tensor, cond: Tensor | PrefixCond | None) -> tuple[Tensor, Tensor | None]:
    """LeRobot's `PiGemmaRMSNorm` (adaRMS) with a per-sample condition (B, Dc), as pi05 uses it, or a
    `PrefixCond`. For the latter this is that norm's forward with the modulation picked per token (its
    own `_norm` and `dense`, its formula): one dense call and one select per norm. Calling the norm once
    per condition and selecting the outputs reuses more of it but doubles the elementwise work, which
    made the tiny expert's step 22% slower on a CPU (launch-bound). Returns (normed (B, L, D), gate)."""
    if not isinstance(cond, PrefixCond):
        return norm(x, cond=cond)
    noisy, clean = norm.dense(cond.both).chunk(2)  # (B, 3D) each
    modulation = torch.where(cond.committed[:, :, None], clean[:, None], noisy[:, None])  # (B, L, 3D)
    scale, shift, gate = modulation.chunk(3, dim=-1)
    normed = norm._norm(x) * (1 + scale.float()) + shift.float()
    return normed.to(x.dtype), gate.to(x.dtype)


def _layer(
    layer: nn.Module,
    x: Tensor,  # (B, Lq, D)
    cos: Tensor,  # (B, Lq, hd)
    sin: Tensor,
    mask: Tensor,  # (B, Lq, Lpast + Lq) bool, True = may attend
    past_k: Tensor | None,
    past_v: Tensor | None,
    cond: Tensor | PrefixCond | None,  # adaRMS condition (B, Dc) or per token (expert only)
    detach_past: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    attn = layer.self_attn
    bsz, lq, _ = x.shape
    h, gate = ada_norm(layer.input_layernorm, x, cond)
    h = h.to(attn.q_proj.weight.dtype)
    q = attn.q_proj(h).view(bsz, lq, -1, attn.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
    k = attn.k_proj(h).view(bsz, lq, -1, attn.head_dim).transpose(1, 2)  # (B, KVH, Lq, hd)
    v = attn.v_proj(h).view(bsz, lq, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
    if past_k is not None:
        # Stop-gradient: sg(K_b), sg(V_b). The reader learns from them; the writer is not updated.
        pk, pv = (past_k.detach(), past_v.detach()) if detach_past else (past_k, past_v)
        k_all, v_all = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
    else:
        k_all, v_all = k, v
    out = F.scaled_dot_product_attention(
        q, k_all, v_all, attn_mask=mask[:, None], scale=attn.scaling, enable_gqa=True
    )  # (B, H, Lq, hd)
    out = attn.o_proj(out.transpose(1, 2).reshape(bsz, lq, -1))
    x = _gated_residual(x, out.to(x.dtype), gate)
    h, gate = ada_norm(layer.post_attention_layernorm, x, cond)
    h = layer.mlp(h.to(layer.mlp.up_proj.weight.dtype))
    x = _gated_residual(x, h.to(x.dtype), gate)
    return x, k_all, v_all


def run_stack(
    model: nn.Module,  # PiGemmaModel
    x: Tensor,  # (B, Lq, D) input embeddings
    positions: Tensor,  # (B, Lq) RoPE positions
    mask: Tensor,  # (B, Lq, Lpast + Lq) bool
    past: list[KV] | None = None,  # per layer, (B, KVH, Lpast, hd)
    cond: Tensor | PrefixCond | None = None,  # adaRMS condition (expert); None for the backbone
    detach_past: bool = False,
    use_checkpoint: bool = False,
) -> tuple[Tensor, list[KV]]:
    """Returns the final-norm hidden states (B, Lq, D) and per-layer K/V over past + these positions."""
    # A query row with nothing to attend to (a padding token) would give NaN in SDPA: let it see itself.
    lpast = mask.shape[-1] - mask.shape[-2]
    eye = torch.eye(mask.shape[-2], dtype=torch.bool, device=mask.device)
    mask = mask.clone()
    mask[..., lpast:] |= eye
    x = x.to(model.layers[0].self_attn.q_proj.weight.dtype)
    cos, sin = model.rotary_emb(x, positions)
    kvs: list[KV] = []
    for i, layer in enumerate(model.layers):
        pk, pv = past[i] if past is not None else (None, None)
        if use_checkpoint and torch.is_grad_enabled():
            x, k, v = checkpoint(
                _layer, layer, x, cos, sin, mask, pk, pv, cond, detach_past, use_reentrant=False
            )
        else:
            x, k, v = _layer(layer, x, cos, sin, mask, pk, pv, cond, detach_past)
        kvs.append((k, v))
    x, _ = ada_norm(model.norm, x, cond)
    return x, kvs
