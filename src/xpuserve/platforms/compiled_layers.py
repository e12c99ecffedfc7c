"""The compiled decode step on CPU: one graph per (layer kind, batch class), each in a Dynamo cache region
of its own, run without guard evaluation once it is compiled.

Why regions: the decoder layers of a model share one code object (DecoderLayer.forward), so Dynamo keeps
every graph of every layer kind and batch size in one cache and, on each call, checks guards entry by
entry until one passes (the profiler's cache lookup: 190-300 us a layer call at batch 1 on the project's
EPYC; the step ~2 ms faster this way, docs/benchmarks.md session 8). Here each region holds the one
graph that serves its inputs, chosen in Python from the layer's kind and the batch size, and the call
runs under `skip_guard_eval_unsafe`: Dynamo then checks only the guards that tell entries apart, which
still include each input tensor's dtype, device and static sizes. The batch classes are the platform's
shape-dependent choices (batch 1 compiles as a constant; a few rows take xpuserve's GEMM), so no
region sees an input its graph was not traced for.
"""

from __future__ import annotations

import bisect
import functools

import torch

SKIP_GUARDS_ERROR = "skip_guard_eval_unsafe"  # what Dynamo's error says when a region would recompile


def _run_layer(layer, x, ctx, rope):
    return layer(x, ctx, rope)


class CompiledLayers:
    """The model's decode forward with each decoder layer compiled. `batch_bounds`: the largest batch of
    each class but the last (ascending); `options`: inductor's."""

    def __init__(self, model: torch.nn.Module, batch_bounds: tuple[int, ...], options: dict):
        self.model = model
        self.batch_bounds = batch_bounds
        self.options = options
        self.kinds = [(type(layer.self_attn), type(layer.mlp)) for layer in model.model.layers]
        self.graphs: dict[tuple, object] = {}  # (kind, batch class) -> its region's compiled function
        self.compiled: set[int] = set()  # batch classes every layer kind has run in
        self._layers: dict[int, list] = {}  # batch class -> the callables standing in for the layers

    def batch_class(self, batch: int) -> int:
        return bisect.bisect_left(self.batch_bounds, batch)

    def warm_up_batches(self, max_batch: int) -> list[int]:
        """The smallest batch of each class up to `max_batch`: what a warm-up runs to compile them all."""
        return [1] + [bound + 1 for bound in self.batch_bounds if bound + 1 <= max_batch]

    def __call__(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        batch_class = self.batch_class(input_ids.shape[0])
        layers = self._layers.get(batch_class)
        if layers is None:
            layers = self._layers[batch_class] = [functools.partial(self._layer, i, batch_class) for i in range(len(self.kinds))]
        if batch_class not in self.compiled:  # the first step of a class compiles, with guards
            hidden = self.model(input_ids, ctx, layers=layers)
            self.compiled.add(batch_class)
            return hidden
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.model(input_ids, ctx, layers=layers)
        except RuntimeError as e:
            # An input unlike the one its region compiled for (Dynamo raises before running the graph).
            # Running the whole step again with guards recompiles; the layers already run write the
            # same cache entries again.
            if SKIP_GUARDS_ERROR not in str(e):
                raise
            return self.model(input_ids, ctx, layers=layers)

    def _layer(self, index: int, batch_class: int, x, ctx, rope):
        key = (self.kinds[index], batch_class)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = torch.compile(_run_layer, dynamic=True, fullgraph=True, options=self.options,
                                                     isolate_recompiles=True)
        return graph(self.model.model.layers[index], x, ctx, rope)
