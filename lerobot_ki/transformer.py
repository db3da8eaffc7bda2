"""One decoder stack forward for both towers, with explicit masks and per-layer K/V.

The backbone and the expert are both Gemma stacks (LeRobot's `PiGemmaModel`). Knowledge insulation needs
one thing transformers' forward does not give: the expert's queries must attend to the backbone's
keys/values of the image+prompt positions, *detached*, while the backbone never sees the expert. So the
backbone runs first and returns its per-layer K/V; the expert then runs with those K/V as its "past".
The same function decodes autoregressively (past = KV cache) and serves both towers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.pi_gemma import _gated_residual
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

KV = tuple[Tensor, Tensor]  # (B, KVH, L, hd) keys and values, RoPE applied


def ada_norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """LeRobot's `PiGemmaRMSNorm` (adaRMS) with a per-sample condition (B, Dc), as pi05 uses it, or a
    per-token one (B, L, Dc) (training-time RTC: committed actions sit at flow time 0, the rest at t).
    LeRobot's norm broadcasts a 2-D condition over the tokens of a 3-D `x`; a per-token condition goes
    through the same norm with tokens as rows ((B*L, D) with (B*L, Dc)), since the RMS statistic and the
    modulation are both per row. Returns (normed (B, L, D), gate (B, L, D) or None)."""
    if cond is None or cond.ndim == 2:
        return norm(x, cond=cond)
    bsz, length, width = x.shape
    h, gate = norm(x.reshape(bsz * length, width), cond=cond.reshape(bsz * length, -1))
    return h.view(bsz, length, width), gate.view(bsz, length, width)


def _layer(
    layer: nn.Module,
    x: Tensor,  # (B, Lq, D)
    cos: Tensor,  # (B, Lq, hd)
    sin: Tensor,
    mask: Tensor,  # (B, Lq, Lpast + Lq) bool, True = may attend
    past_k: Tensor | None,
    past_v: Tensor | None,
    cond: Tensor | None,  # (B, Dc) or per token (B, Lq, Dc) adaRMS condition (expert only)
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
    cond: Tensor | None = None,  # adaRMS condition (B, Dc) or (B, Lq, Dc); None for the backbone
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
