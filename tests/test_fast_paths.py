"""Issue 17's inference optimisations (`lerobot_ki.transformer.FastPaths`) against today's path, on CPU in
float32, tiny preset, 2 cameras, the same noise: the step plan (time condition, adaRMS modulations, mask and
RoPE once per sampler call), fused Q/K/V and gate/up projections, SigLIP over all cameras at once. They
reorder float rounding only (a batched or wider matmul may sum in another order), so the chunks must agree
to 1e-5 (measured: 0 to 3e-7); training is unchanged bit for bit (with gradients on, all run today's path)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_setup import tiny_config

from lerobot_ki import cuda_graphs
from lerobot_ki.cuda_graphs import GraphedSampler
from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.transformer import FastPaths, fast_paths, fused_sources, refresh_fused_weights

ATOL = 1e-5
# Each on its own, the default set, and all (fused gate/up is off by default).
FLAGS = [{"all": False, name: True} for name in FastPaths.__dataclass_fields__] + [{}, {"all": True}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = KIPolicy(tiny_config()).model.eval()
    # The adaRMS denses start at zero (the time would not matter): perturb every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(bsz: int = 2) -> ModelInputs:
    g = torch.Generator().manual_seed(bsz)
    images = [torch.rand(bsz, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]  # 2 cameras
    masks = [torch.ones(bsz, dtype=torch.bool), torch.tensor([True] * (bsz - 1) + [False])]
    ids = torch.randint(4, 260, (bsz, 12), generator=g)
    prompt_mask = torch.ones(bsz, 12, dtype=torch.bool)
    prompt_mask[0, 9:] = False
    return ModelInputs(images, masks, ids, prompt_mask, torch.zeros(bsz, 0))


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: next((k for k, v in f.items() if v), "default"))
@pytest.mark.parametrize("rtc", [False, True], ids=["sync", "training-time-rtc"])
def test_each_fast_path_samples_todays_chunk(model, flags, rtc):
    inputs, noise = _inputs(), torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(5))
    # Training-time RTC: per-token flow times (time 0 on the committed positions) in every adaRMS norm.
    extra = {"committed": torch.randn(2, 10, 8), "delay": torch.tensor([2, 3])} if rtc else {}
    with fast_paths(all=False):
        today = model.sample_actions(inputs, noise, 10, **extra)
    with fast_paths(**flags):
        new = model.sample_actions(inputs, noise, 10, **extra)
    torch.testing.assert_close(new, today, rtol=0, atol=ATOL)
    if rtc:
        assert torch.equal(new[0, :2], extra["committed"][0, :2])
    assert today.abs().max() > 0.1  # a real chunk


def test_training_loss_and_gradients_are_unchanged(model):
    """With gradients on, every flag leaves today's path: the fused weights are detached copies and the
    batched SigLIP is for inference, so the loss and the gradients of the original Q/K/V and gate/up
    parameters are today's, bit for bit."""
    inputs = _inputs(3)
    actions = torch.randn(3, 10, 8)
    flow_mask = torch.ones(3, 10, 8, dtype=torch.bool)
    fast_ids = torch.randint(300, 400, (3, 6))
    fast_mask = torch.ones(3, 6, dtype=torch.bool)
    model.train()
    results = []
    try:
        for flags in ({"all": False}, {}):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)  # same flow noise and time
            with fast_paths(**flags):
                out = model(inputs, fast_ids, fast_mask, actions, flow_mask)
            (out["loss_fast_ce"] + out["loss_flow"]).backward()
            results.append(
                (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            )
    finally:
        model.eval()
    (today, today_grads), (new, new_grads) = results
    for key in ("loss_fast_ce", "loss_flow"):
        assert torch.equal(new[key], today[key])
    assert today_grads.keys() == new_grads.keys()
    assert any("q_proj" in n for n in new_grads) and any("gate_proj" in n for n in new_grads)
    for name, grad in today_grads.items():
        assert torch.equal(new_grads[name], grad), name
    model.zero_grad(set_to_none=True)


def test_fused_weights_follow_in_place_updates_and_leave_the_state_dict_alone(model):
    keys = set(model.state_dict())
    inputs, noise = _inputs(), torch.randn(2, 10, 8)
    with torch.no_grad(), fast_paths(all=True):
        model.sample_actions(inputs, noise, 2)  # builds the caches
        expert = model.paligemma_with_expert.expert_model
        (attn, linears), *_ = fused_sources(expert)
        addresses = refresh_fused_weights(model)
        assert len(addresses) == 2 * 2 * len(expert.layers)  # Q/K/V and gate/up, both towers
        original = attn.k_proj.weight.clone()
        attn.k_proj.weight.add_(0.5)  # an optimizer step: in place
        try:
            assert refresh_fused_weights(model) == addresses  # refreshed where it was (CUDA graphs)
            fused = attn.__dict__["_ki_fused_weight"][1]
            assert torch.equal(fused, torch.cat([lin.weight for lin in linears]))
            with fast_paths(all=False):
                today = model.sample_actions(inputs, noise, 2)
            with fast_paths(all=True):
                new = model.sample_actions(inputs, noise, 2)
            torch.testing.assert_close(new, today, rtol=0, atol=ATOL)
        finally:
            attn.k_proj.weight.copy_(original)
    assert set(model.state_dict()) == keys


def test_graphed_sampler_counts_the_fused_caches_as_weights(model, monkeypatch):
    """The first recording makes the caches: that must not drop the graph at the next call."""
    recorded = []

    def record(self, tensors, spec):
        recorded.append(spec)

        out = self._run(tensors, spec)
        return cuda_graphs._Captured(SimpleNamespace(replay=lambda: None), [t.clone() for t in tensors], out)

    for module in model.modules():  # start without caches, as a fresh model does
        module.__dict__.pop("_ki_fused_weight", None)
    monkeypatch.setattr(GraphedSampler, "_capture", record)
    sampler = GraphedSampler(model, num_steps=3)
    inputs, noise = _inputs(), torch.randn(2, 10, 8)
    with torch.no_grad(), fast_paths(all=True):
        sampler(inputs, noise)
        sampler(inputs, noise)
    assert len(recorded) == 1
