"""The CUDA-graph cache's bookkeeping, on CPU: inputs flattened field by field, one recording per input
signature, and a new recording when the weights move to new storage (not after in-place updates). The
recording itself is stubbed here; `benchmarks/vs_pi05_pi0fast.py` checks real replays on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tiny_setup import tiny_config
from torch import nn

from lerobot_ki import cuda_graphs
from lerobot_ki.cuda_graphs import GraphedSampler
from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.modeling_ki import KIPolicy


def _inputs(bsz: int, prompt_len: int) -> ModelInputs:
    g = torch.Generator().manual_seed(bsz * 100 + prompt_len)
    images = [torch.rand(bsz, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]
    masks = [torch.ones(bsz, dtype=torch.bool), torch.tensor([True] * (bsz - 1) + [False])]
    ids = torch.randint(4, 260, (bsz, prompt_len), generator=g)
    return ModelInputs(images, masks, ids, torch.ones(bsz, prompt_len, dtype=torch.bool), torch.zeros(bsz, 0))


def test_one_recording_per_signature_and_again_after_weights_move(monkeypatch):
    torch.manual_seed(0)
    model = KIPolicy(tiny_config()).model.eval()
    recorded = []

    def record(self, tensors, spec):  # what capture does, minus the CUDA graph: run once, keep the output
        recorded.append(spec)
        output = self._run(tensors, spec)
        return cuda_graphs._Captured(
            SimpleNamespace(replay=lambda: None), [t.clone() for t in tensors], output
        )

    monkeypatch.setattr(GraphedSampler, "_capture", record)
    sampler = GraphedSampler(model, num_steps=3)
    inputs, noise = _inputs(2, 12), torch.randn(2, 10, 8)

    first = sampler(inputs, noise)
    assert torch.equal(first, model.sample_actions(inputs, noise, 3))  # fields rebuilt in order
    sampler(_inputs(2, 12), torch.randn(2, 10, 8))
    assert len(recorded) == 1  # same signature: replayed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # an optimizer step: in place, the recorded graph reads the new values
    sampler(inputs, noise)
    assert len(recorded) == 1
    sampler(_inputs(3, 16), torch.randn(3, 10, 8))
    assert len(recorded) == 2 and len(sampler) == 2  # a new shape: a second graph
    model.action_out_proj.weight = nn.Parameter(model.action_out_proj.weight.detach().clone())
    sampler(inputs, noise)
    assert len(recorded) == 3 and len(sampler) == 1  # new storage: every old graph dropped


def test_a_committed_prefix_is_one_more_recording_and_its_delay_a_graph_input(monkeypatch):
    """Training-time RTC: (committed actions, delay) are graph inputs, so the inpainting sampler is recorded
    once and a new delay replays it (the prefix mask is computed inside the graph)."""
    torch.manual_seed(0)
    model = KIPolicy(tiny_config(rtc_training_max_delay=4)).model.eval()
    recorded = []

    def record(self, tensors, spec):
        recorded.append(spec)
        return cuda_graphs._Captured(
            SimpleNamespace(replay=lambda: None), [t.clone() for t in tensors], self._run(tensors, spec)
        )

    monkeypatch.setattr(GraphedSampler, "_capture", record)
    sampler = GraphedSampler(model, num_steps=3)
    inputs, noise = _inputs(2, 12), torch.randn(2, 10, 8)
    committed, delay = torch.randn(2, 10, 8), torch.tensor([2, 3])
    sampler(inputs, noise)
    first = sampler(inputs, noise, committed, delay)
    assert len(recorded) == 2  # sync and inpainting: two signatures
    assert torch.equal(first, model.sample_actions(inputs, noise, 3, committed=committed, delay=delay))
    assert torch.equal(first[0, :2], committed[0, :2]) and torch.equal(first[1, :3], committed[1, :3])
    sampler(inputs, noise, committed, torch.tensor([4, 1]))
    assert len(recorded) == 2  # a new delay: replayed
