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


def _inputs(bsz: int, prompt_len: int, seed: int = 0) -> ModelInputs:
    g = torch.Generator().manual_seed(bsz * 100 + prompt_len + 1000 * seed)
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


def _replaying_record(recorded: list):
    """`cuda_graphs.record` minus CUDA, with a graph's semantics: the recording leaves the output buffers
    unset (poisoned with NaN here, so a missing replay shows), and each replay runs the function again on
    whatever its static input buffers hold, writing into those same output buffers."""

    def record(fn, warmup):
        output = fn()
        outs = output if isinstance(output, list) else [output]
        for o in outs:
            if o.is_floating_point():
                o.fill_(float("nan"))

        def replay():
            fresh = fn()
            for o, f in zip(outs, fresh if isinstance(fresh, list) else [fresh], strict=True):
                o.copy_(f)

        recorded.append(fn)
        return SimpleNamespace(replay=replay), output

    return record


def test_guided_rtc_replays_its_prefill_and_expert_step_and_gives_the_eager_chunk(monkeypatch):
    """RTC guidance (LeRobot's eager loop) with the prefill and the expert step as two recorded graphs: the
    chunk is the eager guided sampler's, new inputs of the same signature replay the same two graphs (so
    they are copied into the static buffers the graphs read), and a new shape records two more."""
    from lerobot.policies.rtc.configuration_rtc import RTCConfig
    from lerobot.policies.rtc.modeling_rtc import RTCProcessor

    torch.manual_seed(0)
    model = KIPolicy(tiny_config()).model.eval()
    with torch.no_grad():  # adaRMS starts at zero: perturbed so that the flow time matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    recorded = []
    monkeypatch.setattr(cuda_graphs, "record", _replaying_record(recorded))
    sampler = GraphedSampler(model, num_steps=3)
    rtc = RTCProcessor(RTCConfig(execution_horizon=10))

    def both(inputs, noise, leftover):
        kwargs = dict(inference_delay=2, prev_chunk_left_over=leftover, execution_horizon=10)
        graphed = sampler.guided(inputs, noise, rtc, True, **kwargs)
        eager = model.sample_actions(inputs, noise, 3, rtc, True, **kwargs)
        return graphed, eager

    for seed in (1, 2):  # the second: new values, same signature
        g = torch.Generator().manual_seed(seed)
        noise, leftover = torch.randn(2, 10, 8, generator=g), torch.randn(2, 7, 8, generator=g)
        graphed, eager = both(_inputs(2, 12, seed), noise, leftover)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)
        assert len(recorded) == 2 and len(sampler) == 1
    unguided = model.sample_actions(_inputs(2, 12, seed), noise, 3)
    assert not torch.allclose(graphed, unguided, atol=1e-3)  # the guidance acted
    graphed, eager = both(_inputs(3, 16), torch.randn(3, 10, 8), torch.randn(3, 7, 8))
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)
    assert len(recorded) == 4 and len(sampler) == 2
