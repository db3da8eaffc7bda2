"""The knowledge-insulation structure of DESIGN.md section 2, checked on the tiny preset."""

from __future__ import annotations

import pytest
import torch
from lerobot.policies.common.vla_utils import make_att_2d_masks
from lerobot.utils.constants import ACTION, ACTION_TOKEN_MASK, ACTION_TOKENS
from synthetic_dataset import make_dataset
from tiny_setup import batch_of, build

from lerobot_ki.model_inputs import robot_inputs


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ki_structure") / "ds"
    make_dataset(root)
    return root


def _backbone_params(policy):
    return {n: p for n, p in policy.model.paligemma_with_expert.paligemma.named_parameters()}


def _flow_only_grads(dataset_root, stop_gradient: bool):
    policy, pre, _, ds = build(dataset_root, fast_loss_weight=0.0, stop_gradient=stop_gradient)
    policy.train()
    loss, info = policy.forward(batch_of(ds, pre, range(0, 40, 5)))
    assert info["loss_fast_ce"] > 0  # the CE is computed (and logged) but weighted out
    loss.backward()
    return policy, _backbone_params(policy)


def test_flow_loss_never_reaches_the_backbone_with_stop_gradient(dataset_root):
    policy, params = _flow_only_grads(dataset_root, stop_gradient=True)
    leaked = [n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0]
    assert leaked == [], f"flow loss leaked into backbone parameters: {leaked[:5]}"
    # ... while the expert itself does learn from it.
    expert_grads = [p.grad for p in policy.model.paligemma_with_expert.gemma_expert.parameters()]
    assert any(g is not None and g.abs().max() > 0 for g in expert_grads)


def test_flow_loss_reaches_the_backbone_without_stop_gradient(dataset_root):
    _, params = _flow_only_grads(dataset_root, stop_gradient=False)
    nonzero = {n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0}
    # Joint training: the expert's loss flows into the vision tower, the embeddings and the layers whose
    # K/V it reads. (The last layer's MLP, the final norm and the LM head feed only the logits.)
    for name in (
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.multi_modal_projector.linear.weight",
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.0.self_attn.k_proj.weight",
        "model.language_model.layers.0.mlp.down_proj.weight",
        "model.language_model.layers.3.self_attn.v_proj.weight",
    ):
        assert name in nonzero, name


def _prefix_and_fast(policy, batch):
    prefix_embs, prefix_pad = policy.model.embed_prefix(robot_inputs(batch, policy.config))
    return prefix_embs, prefix_pad, batch[ACTION_TOKENS], batch[ACTION_TOKEN_MASK].bool()


def _run_backbone(model, prefix_embs, prefix_pad, fast_ids, fast_mask):
    fast_embs = model.paligemma_with_expert.embed_language_tokens(fast_ids).to(prefix_embs.dtype)
    hidden, kv = model._backbone(
        torch.cat([prefix_embs, fast_embs], 1),
        torch.cat([prefix_pad, fast_mask], 1),
        torch.cat([torch.zeros_like(prefix_pad), torch.ones_like(fast_mask)], 1),
    )
    return model.paligemma_with_expert.lm_logits(hidden), kv


def test_fast_tokens_change_neither_prefix_nor_expert(dataset_root):
    policy, pre, _, ds = build(dataset_root)
    policy.eval()
    batch = batch_of(ds, pre, [0, 7, 33, 61])
    model = policy.model
    with torch.no_grad():
        prefix_embs, prefix_pad, fast_a, mask_a = _prefix_and_fast(policy, batch)
        fast_b = torch.where(mask_a, fast_a.flip(0), fast_a)  # other samples' (valid) FAST ids
        assert not torch.equal(fast_a, fast_b)
        n_prefix = prefix_pad.shape[1]
        logits_a, kv_a = _run_backbone(model, prefix_embs, prefix_pad, fast_a, mask_a)
        logits_b, kv_b = _run_backbone(model, prefix_embs, prefix_pad, fast_b, mask_a)
        _, kv_none = model.prefill(prefix_embs, prefix_pad)

        # Image/prompt logits do not see the FAST tokens ...
        torch.testing.assert_close(logits_a[:, :n_prefix], logits_b[:, :n_prefix], rtol=0, atol=1e-5)
        # ... while the FAST positions do (so this comparison can fail).
        assert (logits_a[:, n_prefix:] - logits_b[:, n_prefix:]).abs().max() > 1e-2

        # Backbone K/V at image+prompt positions: identical with and without FAST tokens appended.
        for (ka, va), (kn, vn) in zip(kv_a, kv_none, strict=True):
            torch.testing.assert_close(ka[:, :, :n_prefix], kn, rtol=0, atol=1e-5)
            torch.testing.assert_close(va[:, :, :n_prefix], vn, rtol=0, atol=1e-5)

        # The expert's velocity reads only the prefix K/V: same output whatever the FAST tokens were.
        x_t = torch.randn(4, policy.config.chunk_size, policy.config.max_action_dim)
        t = torch.full((4,), 0.5)
        prefix_kv = lambda kv: [(k[:, :, :n_prefix], v[:, :, :n_prefix]) for k, v in kv]  # noqa: E731
        v_a = model.velocity(prefix_kv(kv_a), prefix_pad, x_t, t)
        v_b = model.velocity(prefix_kv(kv_b), prefix_pad, x_t, t)
        torch.testing.assert_close(v_a, v_b, rtol=0, atol=1e-5)
        # The velocity does depend on the prefix (the expert really reads the backbone).
        kv_shuffled = [(k.flip(0), v.flip(0)) for k, v in prefix_kv(kv_a)]
        v_shuffled = model.velocity(kv_shuffled, prefix_pad.flip(0), x_t, t)
        assert (v_a - v_shuffled).abs().max() > 1e-3


def test_noisy_actions_change_no_backbone_logit(dataset_root):
    policy, pre, _, ds = build(dataset_root)
    policy.train()
    batch = batch_of(ds, pre, [3, 25, 50, 90])
    captured = []
    hook = policy.model.paligemma_with_expert.paligemma.lm_head.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().clone())
    )
    flow = []
    for scale in (1.0, -3.0):
        changed = dict(batch)
        changed[ACTION] = batch[ACTION] * scale
        torch.manual_seed(0)
        _, info = policy.forward(changed)
        flow.append(info["loss_flow"])
    hook.remove()
    assert len(captured) == 2
    torch.testing.assert_close(captured[0], captured[1], rtol=0, atol=0)
    assert abs(flow[0] - flow[1]) > 1e-3  # the actions did reach the expert


def test_attention_mask_layout():
    """prefix-LM over images+prompt, causal FAST tokens that see the prefix, prefix blind to FAST."""
    n_prefix, n_fast = 5, 4
    pad = torch.ones(1, n_prefix + n_fast, dtype=torch.bool)
    causal = torch.tensor([[0] * n_prefix + [1] * n_fast])
    mask = make_att_2d_masks(pad, causal)[0]  # the flags KIModel.forward passes
    assert mask[:n_prefix, :n_prefix].all()
    assert not mask[:n_prefix, n_prefix:].any()
    assert mask[n_prefix:, :n_prefix].all()
    assert torch.equal(mask[n_prefix:, n_prefix:], torch.ones(n_fast, n_fast, dtype=torch.bool).tril())


def test_padding_is_excluded_from_the_flow_loss(dataset_root, monkeypatch):
    """With zero noise and t=0.5, x_t = a/2 and the target is u = -a. A velocity that is exact on real steps
    and dims but wrong on padded ones must give exactly zero flow loss."""
    policy, pre, _, ds = build(dataset_root)
    policy.train()
    model = policy.model
    batch = batch_of(ds, pre, [0, 5, 10, 15])
    batch["action_is_pad"] = batch["action_is_pad"].clone()
    batch["action_is_pad"][:, 6:] = True
    real_dims = batch[ACTION].shape[-1]
    monkeypatch.setattr(model, "sample_noise", lambda shape, device: torch.zeros(shape, device=device))
    monkeypatch.setattr(model, "sample_time", lambda bsize, device: torch.full((bsize,), 0.5, device=device))

    def velocity(prefix_kv, prefix_pad, x_t, time):
        v = -2 * x_t  # == u on every element
        v[:, 6:] += 5.0  # wrong on padded steps
        v[..., real_dims:] += 5.0  # and on padded action dims
        return v

    monkeypatch.setattr(model, "velocity", velocity)
    assert policy.forward(batch)[1]["loss_flow"] == 0.0
    batch["action_is_pad"][:, 6:] = False  # the same error on real steps is counted
    assert policy.forward(batch)[1]["loss_flow"] > 1.0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dataset_root):
    plain, pre, _, ds = build(dataset_root)
    ckpt, _, _, _ = build(dataset_root, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.gradient_checkpointing_enabled and not plain.model.gradient_checkpointing_enabled
    batch = batch_of(ds, pre, [1, 9, 17, 40])
    grads = []
    for policy in (plain, ckpt):
        policy.train()
        torch.manual_seed(7)
        loss, _ = policy.forward(batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
