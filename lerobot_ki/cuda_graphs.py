"""Replay a whole inference call (SigLIP + backbone prefill + 10 expert steps) as one CUDA graph.

At batch 1 the eager sampler launches thousands of small kernels (18 backbone layers once, 18 expert
layers ten times); on an H100 the launch gaps, not the arithmetic, set the latency. A CUDA graph records
the launches once per input signature and replays them with one call. The recorded function must be
free of host synchronisation and host->device copies (`KIModel.sample_actions` without RTC is).

RTC guidance cannot be recorded whole: LeRobot's guided Euler loop copies each step's time and prefix weights
from the host and calls autograd. Its two expensive parts can: the prefill (SigLIP + backbone, once per chunk)
and the expert's velocity call (once per step), each recorded as its own graph and replayed from LeRobot's
loop (`GraphedSampler.guided`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from torch import Tensor, nn

from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.transformer import refresh_fused_weights
from lerobot_ki.vla_model import integrate_guided


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static buffers the graph reads; new inputs are copied into them
    output: Tensor | list[Tensor]  # static buffer(s) the graph writes


@dataclass
class _GuidedCaptured:
    """RTC-guided sampling: the prefill's graph, and the expert step's graph, which reads the prefix K/V
    and mask where the prefill's graph writes them (its `output`: [k_0, v_0, ..., prefix_pad])."""

    prefill: _Captured
    step: _Captured  # inputs: [x_t (B, T, A), time (B,)]


def record(
    fn: Callable[[], Tensor | list[Tensor]], warmup: int
) -> tuple[torch.cuda.CUDAGraph, Tensor | list[Tensor]]:
    """Records `fn` (which reads static buffers) as a CUDA graph: (graph, the output buffers it writes).
    Recording does not run the kernels: the outputs hold their values only after a replay."""
    # Warm-up outside the graph on a side stream: cuBLAS handles, lazy module state and the caching
    # allocator must be initialised before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def flatten(inputs: ModelInputs) -> tuple[list[Tensor], tuple]:
    """The tensors of `inputs` field by field (lists in order), and the structure to rebuild it."""
    tensors, spec = [], []
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if isinstance(value, list):
            tensors.extend(value)
            spec.append((f.name, len(value)))
        else:
            tensors.append(value)
            spec.append((f.name, None))
    return tensors, tuple(spec)


def unflatten(tensors: list[Tensor], spec: tuple) -> ModelInputs:
    fields, i = {}, 0
    for name, length in spec:
        if length is None:
            fields[name], i = tensors[i], i + 1
        else:
            fields[name], i = list(tensors[i : i + length]), i + length
    return ModelInputs(**fields)


class GraphedSampler:
    """`sampler(inputs, noise)` == `model.sample_actions(inputs, noise, num_steps)` (and with
    `committed, delay`, the training-time RTC inpainting), captured on first use for each input signature
    (fields, shapes, dtypes, with or without a committed prefix). `sampler.guided(...)` is RTC-guided
    sampling with its prefill and expert step replayed (see the module's docstring).

    Weights are read by address: in-place updates (an optimizer step, `load_state_dict`) are seen by later
    replays (the fused projection weights derived from them are refreshed in place before each replay).
    Anything that gives a weight new storage (`.to()`, a dtype cast, assigning a parameter) changes the
    model's addresses, which this cache checks on every call: it then records its graphs again."""

    def __init__(self, model: nn.Module, num_steps: int, max_entries: int = 4, warmup: int = 2):
        self.model = model
        self.num_steps = num_steps
        self.max_entries = max_entries
        self.warmup = warmup
        self._entries: OrderedDict[tuple, _Captured | _GuidedCaptured] = OrderedDict()
        self._addresses: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(
        self,
        inputs: ModelInputs,
        noise: Tensor,  # (B, T, A)
        committed: Tensor | None = None,  # (B, T, A) training-time RTC: the committed actions to inpaint
        delay: Tensor | None = None,  # (B,) long: how many of them
    ) -> Tensor:
        tensors, spec = flatten(inputs)
        # The committed actions and their count are graph inputs like the noise: a new delay replays the
        # same graph (the prefix mask is computed on the device inside it).
        sampler_args = [noise] if committed is None else [noise, committed, delay]
        tensors.extend(sampler_args)
        entry = self._lookup((spec, len(sampler_args)), tensors, self._capture)
        entry.graph.replay()
        return entry.output.clone()

    @torch.no_grad()  # as sample_actions; LeRobot's guidance enables grad for its own step
    def guided(
        self,
        inputs: ModelInputs,
        noise: Tensor,  # (B, T, A)
        rtc_processor: RTCProcessor,
        rtc_enabled: bool,
        **rtc_kwargs,
    ) -> Tensor:
        """`model.sample_actions(inputs, noise, num_steps, rtc_processor, rtc_enabled, **rtc_kwargs)`:
        LeRobot's guided Euler loop, eager, with the prefill replayed once and the expert's velocity replayed
        at each step. Only for a guidance that does not differentiate through the velocity (a graph replay
        has no autograd): `vla_model.guidance_differentiates_velocity()` is False, as in LeRobot 0.6.1."""
        tensors, spec = flatten(inputs)
        entry = self._lookup(("guided", spec), [*tensors, noise], self._capture_guided)
        entry.prefill.graph.replay()
        x_buf, time_buf = entry.step.inputs

        def velocity(x_t: Tensor, time: Tensor) -> Tensor:
            x_buf.copy_(x_t)
            time_buf.copy_(time)
            entry.step.graph.replay()
            return entry.step.output.clone()  # the next replay overwrites the buffer

        return integrate_guided(velocity, noise, self.num_steps, rtc_processor, rtc_enabled, **rtc_kwargs)

    def _lookup(self, spec: tuple, tensors: list[Tensor], capture: Callable) -> _Captured | _GuidedCaptured:
        """The recording for this input signature (made by `capture(tensors, spec)` the first time), with
        `tensors` copied into its static input buffers."""
        addresses = self._weight_addresses()
        if addresses != self._addresses:  # new storage: the recorded graphs read the old one
            self._entries.clear()
        key = (spec, *((tuple(a.shape), a.dtype, a.device) for a in tensors))
        entry = self._entries.get(key)
        if entry is None:
            entry = capture(tensors, spec)
            self._entries[key] = entry
            if len(self._entries) > self.max_entries:  # each graph holds its own memory pool
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            buffers = entry.inputs if isinstance(entry, _Captured) else entry.prefill.inputs
            for buf, a in zip(buffers, tensors, strict=True):
                buf.copy_(a)
        # A first recording made the fused-weight caches (transformer.fused_weight): count them as read.
        self._addresses = self._weight_addresses()
        return entry

    def _weight_addresses(self) -> tuple[int, ...]:
        """Where the graphs read their weights: parameters, buffers and the fused Q/K/V and gate/up
        weights derived from them, the latter first refreshed in place after in-place weight updates."""
        params = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        return params + refresh_fused_weights(self.model)

    def _run(self, tensors: list[Tensor], spec: tuple) -> Tensor:  # the sync sampler on flattened inputs
        input_spec, n_args = spec
        noise, *prefix = tensors[-n_args:]  # prefix: [] or [committed, delay]
        inputs = unflatten(tensors[:-n_args], input_spec)
        return self.model.sample_actions(inputs, noise, self.num_steps, None, False, *prefix)

    def _capture(self, tensors: list[Tensor], spec: tuple) -> _Captured:
        inputs = [a.clone() for a in tensors]
        graph, output = record(lambda: self._run(inputs, spec), self.warmup)
        return _Captured(graph, inputs, output)

    def _capture_guided(self, tensors: list[Tensor], spec: tuple) -> _GuidedCaptured:
        inputs = [a.clone() for a in tensors]  # [*flattened ModelInputs, noise]
        model_inputs = unflatten(inputs[:-1], spec[1])

        def prefill() -> list[Tensor]:
            prefix_kv, prefix_pad = self.model.prefix_cache(model_inputs)
            return [*(t for kv in prefix_kv for t in kv), prefix_pad]

        graph, prefix = record(prefill, self.warmup)
        graph.replay()  # the step's warm-up then reads a real prefix
        kv = [(prefix[i], prefix[i + 1]) for i in range(0, len(prefix) - 1, 2)]
        noise = inputs[-1]
        step_inputs = [noise.clone(), noise.new_ones(noise.shape[0], dtype=torch.float32)]  # x_t, time (B,)
        expert = self.model.inference_velocity()
        step_graph, velocity = record(lambda: expert(kv, prefix[-1], *step_inputs), self.warmup)
        return _GuidedCaptured(_Captured(graph, inputs, prefix), _Captured(step_graph, step_inputs, velocity))
