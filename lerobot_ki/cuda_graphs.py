"""Replay a whole inference call (SigLIP + backbone prefill + 10 expert steps) as one CUDA graph.

At batch 1 the eager sampler launches thousands of small kernels (18 backbone layers once, 18 expert
layers ten times); on an H100 the launch gaps, not the arithmetic, set the latency. A CUDA graph records
the launches once per input signature and replays them with one call. The recorded function must be
free of host synchronisation and host->device copies (see `KIModel.sample_from_inputs`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static buffers the graph reads; new inputs are copied into them
    output: Tensor  # static buffer the graph writes


class CUDAGraphCache:
    """`cache(*tensors)` == `fn(*tensors)`, captured on first use for each (shape, dtype) signature.

    Weights are read by address, so in-place updates (an optimizer step) are seen by later replays;
    replacing a parameter tensor is not: call `clear()` after loading or moving weights."""

    def __init__(self, fn: Callable[..., Tensor], max_entries: int = 4, warmup: int = 2):
        self.fn = fn
        self.max_entries = max_entries
        self.warmup = warmup
        self._entries: OrderedDict[tuple, _Captured] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __call__(self, *args: Tensor) -> Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(args)
            self._entries[key] = entry
            if len(self._entries) > self.max_entries:  # each graph holds its own memory pool
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            for buf, a in zip(entry.inputs, args, strict=True):
                buf.copy_(a)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, args: tuple[Tensor, ...]) -> _Captured:
        inputs = [a.clone() for a in args]
        # Warm-up outside the graph on a side stream: cuBLAS handles, lazy module state and the
        # caching allocator must be initialised before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        return _Captured(graph, inputs, output)
