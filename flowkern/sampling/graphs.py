"""CUDA-graph capture and replay of a whole sampling loop (flowkern.sampling,
``cuda_graph=True``): the graphs are cached per (model, shape, dtype,
device, plan), so later calls only copy x_init in and replay."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..ops._registry import empty_output
from .run import Run

_GRAPHS: "OrderedDict[tuple, _Graphed]" = OrderedDict()
_GRAPH_CACHE_SIZE = 4


class _Graphed:
    """A captured loop. It keeps everything the graph's kernels read or write
    alive: the run (its buffers, and through the plan the step tables and
    time vectors), the input and output buffers, and the model."""

    def __init__(self, graph, run, x_in, x_out, model):
        self.graph, self.run, self.x_in, self.x_out, self.model = graph, run, x_in, x_out, model


def clear_graph_cache():
    """Drop the CUDA graphs (and their memory) that ``sample(cuda_graph=True)`` keeps."""
    _GRAPHS.clear()


def run_graphed(plan, model, x_init, loop):
    """The final state of loop(run, x) from x_init, by replaying its graph."""
    if x_init.device.type != "cuda":
        raise ValueError(f"cuda_graph: CUDA graphs need CUDA tensors, x_init is on "
                         f"{x_init.device}; use cuda_graph=False on CPU")
    if os.environ.get("FLOWKERN_DEBUG") == "1":
        raise ValueError("cuda_graph: FLOWKERN_DEBUG=1 turns on value checks that synchronise "
                         "with the host and cannot be captured; unset it or use cuda_graph=False")
    key = (id(model), tuple(x_init.shape), x_init.dtype, x_init.device, plan.key())
    with torch.cuda.device(x_init.device):
        hit = _GRAPHS.get(key)
        if hit is not None and hit.model is model:
            _GRAPHS.move_to_end(key)
            hit.x_in.copy_(x_init)
            if plan.noise.seeds is not None:  # the graph reads the first call's seeds
                hit.run.p.noise.seeds.copy_(plan.noise.seeds)
            hit.graph.replay()
            return hit.x_out.clone()
        x_in = empty_output(x_init).copy_(x_init)
        run = Run(plan, model, x_in, checks=False)
        # Warm up on a side stream: the whole loop once, so that every kernel
        # variant is compiled (Triton) and the model's lazy state exists before
        # capture. Its result is discarded; the replay below recomputes it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(loop, x_in)
        torch.cuda.current_stream().wait_stream(side)
        run.draws, run.first_call = 0, True
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_out = run(loop, x_in)          # reads x_in, writes the run's static buffers
        graph.replay()
        _GRAPHS[key] = _Graphed(graph, run, x_in, x_out, model)
        while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
        return x_out.clone()
