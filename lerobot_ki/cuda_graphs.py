"""Replay a whole inference call (SigLIP + backbone prefill + 10 expert steps) as one CUDA graph.

At batch 1 the eager sampler launches thousands of small kernels (18 backbone layers once, 18 expert
layers ten times); on an H100 the launch gaps, not the arithmetic, set the latency. A CUDA graph records
the launches once per input signature and replays them with one call. The recorded function must be
free of host synchronisation and host->device copies (`KIModel.sample_actions` without RTC is).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.transformer import refresh_fused_weights


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static buffers the graph reads; new inputs are copied into them
    output: Tensor  # static buffer the graph writes


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
    (fields, shapes, dtypes, with or without a committed prefix).

    Weights are read by address: in-place updates (an optimizer step, `load_state_dict`) are seen by later
    replays (the fused projection weights derived from them are refreshed in place before each replay).
    Anything that gives a weight new storage (`.to()`, a dtype cast, assigning a parameter) changes the
    model's addresses, which this cache checks on every call: it then records its graphs again."""

    def __init__(self, model: nn.Module, num_steps: int, max_entries: int = 4, warmup: int = 2):
        self.model = model
        self.num_steps = num_steps
        self.max_entries = max_entries
        self.warmup = warmup
        self._entries: OrderedDict[tuple, _Captured] = OrderedDict()
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
        addresses = self._weight_addresses()
        if addresses != self._addresses:  # new storage: the recorded graphs read the old one
            self._entries.clear()
        tensors, spec = flatten(inputs)
        # The committed actions and their count are graph inputs like the noise: a new delay replays the
        # same graph (the prefix mask is computed on the device inside it).
        sampler_args = [noise] if committed is None else [noise, committed, delay]
        tensors.extend(sampler_args)
        spec = (spec, len(sampler_args))
        key = (spec, *((tuple(a.shape), a.dtype, a.device) for a in tensors))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(tensors, spec)
            self._entries[key] = entry
            if len(self._entries) > self.max_entries:  # each graph holds its own memory pool
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            for buf, a in zip(entry.inputs, tensors, strict=True):
                buf.copy_(a)
        # A first recording made the fused-weight caches (transformer.fused_weight): count them as read.
        self._addresses = self._weight_addresses()
        entry.graph.replay()
        return entry.output.clone()

    def _weight_addresses(self) -> tuple[int, ...]:
        """Where the graphs read their weights: parameters, buffers and the fused Q/K/V and gate/up
        weights derived from them, the latter first refreshed in place after in-place weight updates."""
        params = tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        return params + refresh_fused_weights(self.model)

    def _run(self, tensors: list[Tensor], spec: tuple) -> Tensor:
        input_spec, n_args = spec
        noise, *prefix = tensors[-n_args:]  # prefix: [] or [committed, delay]
        inputs = unflatten(tensors[:-n_args], input_spec)
        return self.model.sample_actions(inputs, noise, self.num_steps, None, False, *prefix)

    def _capture(self, tensors: list[Tensor], spec: tuple) -> _Captured:
        inputs = [a.clone() for a in tensors]
        # Warm-up outside the graph on a side stream: cuBLAS handles, lazy module state and the
        # caching allocator must be initialised before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run(inputs, spec)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self._run(inputs, spec)
        return _Captured(graph, inputs, output)
