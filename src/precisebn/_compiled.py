"""Running batches compiled: one ``torch.compile``d graph per model that returns only the
batch statistics.

The graph is a pure function of the bound tensors and the batch: ``functional_call`` of the
model with private tensors in place of its buffers, under a `torch.overrides.TorchFunctionMode`
that dynamo traces along with the forward. At trace time the mode sees every torch call:

- a recomputed layer's batch-norm call (the layer's two private statistics as
  ``running_mean`` and ``running_var``) becomes a training-mode normalisation, and the
  batch's mean and unbiased variance (``torch.var_mean``, in float32 or wider) and its
  number of values per channel (the input's size over its channel dimension, from the
  traced shapes) become outputs of the graph;
- any other use of those statistics (a slice, a read, a mismatched pair) is noted as a
  reason the graph cannot stand for the eager run, and the run goes eager.

Because the graph returns only the statistics, whatever the forward computes after the
last recomputed layer that the statistics do not depend on (a classifier, detection heads)
is dead code, and the compiler leaves it out. Dynamo's guards decide when a graph no
longer fits the batch (another shape, another branch of the forward) and trace anew: each
graph was checked by the mode as it was traced, so counts always come from the shapes that
graph computes with. Buffers other than the statistics are bound as private copies, so
what the forward writes lands there; every recomputed layer's ``num_batches_tracked`` is
bound as ``None``, which a stock BatchNorm layer reads as "no counter".

Compiled graphs are kept per model, layers and forward function (`cached`), so a run that
is repeated (a callback that recomputes every epoch) compiles once.

Dynamo traces a torch-function mode entered inside the compiled function from torch 2.8 on
(2.6 and 2.7 stop at the ``with``: "Graph break under GenericContextWrappingVariable"); on
older torch a compiled model runs eagerly, with one info log saying so (`unsupported`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from precisebn._batches import Forward
from precisebn._binding import Binding, Resolved
from precisebn._layers import MEAN, VAR, buffer_key
from precisebn._tags import batch_norm_arguments, one_value_message, operator_name

__all__ = ["Compiled", "CompiledRow", "GraphState", "cached", "unsupported"]

logger = logging.getLogger("precisebn")

COMPILES_FROM = (2, 8)
"""The first torch release whose dynamo traces the statistics' mode."""


def unsupported() -> str | None:
    """Why this torch cannot run a recompute compiled, or ``None`` when it can."""
    version = torch.__version__.split("+")[0]
    if tuple(int(p) for p in version.split(".")[:2]) >= COMPILES_FROM:
        return None
    floor = ".".join(map(str, COMPILES_FROM))
    return f"compiled runs need torch>={floor} (this is torch {version})"


class CompiledRow(NamedTuple):
    """What one batch through a compiled graph gave."""

    row: Tensor
    """``[2, C]``: each layer's first call's batch mean and unbiased variance, laid end to
    end (zeros for a layer the batch did not reach)."""
    counts: tuple[int, ...]
    """Per layer, values per channel of its first call (0: not reached)."""
    extras: tuple[tuple[int, Tensor, int], ...]
    """Later calls of reused layers: ``(layer index, [2, C_i] moments, count)``."""
    problems: tuple[str, ...]
    """Why the graph cannot stand for the eager run (empty when it can)."""
    degenerate: str | None
    """Why the batch cannot count (a layer saw one value per channel), if it cannot."""


class _StatsMode(TorchFunctionMode):
    """At trace time: batch-norm calls on the markers become statistics; other uses of the
    markers become problems."""

    def __init__(self, means: list[Tensor], variances: list[Tensor], names: list[str]) -> None:
        super().__init__()
        self.means, self.variances, self.names = means, variances, names
        self.calls: list[tuple[int, Tensor, int]] = []
        self.problems: list[str] = []
        self.degenerate: str | None = None

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            named = batch_norm_arguments(func, args, kwargs)
            i = self._layer(named.get("running_mean"), named.get("running_var"))
            if i is not None:
                return self._record(i, named)
        elif self._touches_markers((args, kwargs)):
            self.problems.append(f"a running statistic is used by {operator_name(func)}")
        return func(*args, **kwargs)

    def _layer(self, mean: Any, var: Any) -> int | None:
        for i, (m, v) in enumerate(zip(self.means, self.variances, strict=True)):
            if mean is m and var is v:
                return i
            if mean is m or var is v:
                self.problems.append(f"layer '{self.names[i]}' is called with other statistics")
                return None
        if self._touches_markers((mean, var)):
            self.problems.append("a batch_norm call passes a slice or copy of the statistics")
        return None

    def _touches_markers(self, values: Any) -> bool:
        """Whether a marker is among ``values`` (arguments, one level of lists and dicts deep:
        plain Python, which dynamo traces)."""
        markers = [*self.means, *self.variances]
        stack = list(values)
        while stack:
            value = stack.pop()
            if isinstance(value, (list, tuple)):
                stack.extend(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, Tensor) and any(value is m for m in markers):
                return True
        return False

    def _record(self, i: int, named: dict[str, Any]) -> Tensor:
        x: Tensor = named["input"]
        count = x.numel() // x.shape[1]
        if count < 2 and self.degenerate is None:
            self.degenerate = one_value_message(self.names[i], count, tuple(x.shape))
        if count >= 2:
            dims = [0, *range(2, x.dim())]
            wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
            var, mean = torch.var_mean(wide, dims, correction=1)
            self.calls.append((i, torch.stack([mean, var]), count))
        weight, bias, eps = named["weight"], named["bias"], named["eps"]
        # The training-mode output; torch.batch_norm, unlike F.batch_norm, takes a batch of
        # one value per channel (which then counts for nothing).
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, False)

    def result(self, sizes: list[int], dtype: torch.dtype, device: torch.device) -> CompiledRow:
        first: dict[int, tuple[Tensor, int]] = {}
        extras = []
        for i, moments, count in self.calls:
            if i in first:
                extras.append((i, moments.to(torch.float64), count))
            else:
                first[i] = (moments.to(dtype), count)
        parts = [
            first[i][0] if i in first else torch.zeros(2, size, dtype=dtype, device=device)
            for i, size in enumerate(sizes)
        ]
        counts = tuple(first[i][1] if i in first else 0 for i in range(len(sizes)))
        row = torch.cat(parts, dim=1)
        return CompiledRow(row, counts, tuple(extras), tuple(self.problems), self.degenerate)


class GraphState(NamedTuple):
    """What a run binds for its graph: the bound tensors, and the private buffer copies
    among them, keyed like the model's buffers (an eager batch of the run binds those)."""

    bound: dict[str, Tensor | None]
    buffers: dict[str, Tensor]


class _Caller(nn.Module):
    """The model as a child, and the forward that feeds it a batch."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.m = model
        self.feed = forward

    def forward(self, batch: Any) -> Any:
        return self.feed(self.m, batch)


Stats = Callable[[dict[str, Tensor | None], Any], CompiledRow]
"""``stats(state, batch) -> CompiledRow``: a compiled graph and the tensors it binds."""


class Compiled:
    """A model's compiled statistics: the graph, and the private tensors it is run with."""

    def __init__(self, binding: Binding, forward: Forward, options: Mapping[str, Any]) -> None:
        self.binding = binding
        layout = binding.layout
        names, sizes = layout.names, layout.sizes
        caller = _Caller(binding.target, forward)
        keys = [(buffer_key(n, MEAN), buffer_key(n, VAR)) for n in names]
        prefix = binding.prefix

        def stats(state: dict[str, Tensor | None], batch: Any) -> CompiledRow:
            means = [state["m." + mean.removeprefix(prefix)] for mean, _ in keys]
            variances = [state["m." + var.removeprefix(prefix)] for _, var in keys]
            mode = _StatsMode(means, variances, names)  # type: ignore[arg-type]
            with mode:
                torch.func.functional_call(caller, state, (batch,), strict=False)  # type: ignore[arg-type]
            first = means[0]
            assert first is not None
            return mode.result(sizes, self.dtype, first.device)

        self.dtype = torch.float32
        self.graph: Stats = torch.compile(stats, fullgraph=True, **dict(options))

    def run(self, state: GraphState, batch: Any) -> CompiledRow | str:
        """One batch through the graph, or why the graph cannot stand for the eager run:
        a form of the forward the mode cannot follow, or an error while compiling (the
        eager run then meets a real error of the forward again)."""
        try:
            out = self.graph(state.bound, batch)
        except Exception as error:  # dynamo's Unsupported, a backend failure, ...
            text = str(error).strip().splitlines()
            return f"{type(error).__name__} while compiling: {text[0] if text else ''}"
        if out.problems:
            return out.problems[0]
        return out

    def state(self, resolved: Resolved) -> GraphState:
        """The tensors a run's batches go through the graph with: private copies of every
        buffer (the statistics' copies are the markers), ``None`` for the recomputed layers'
        counters, and the parameters given in place of the model's."""
        binding, prefix = self.binding, self.binding.prefix
        self.dtype = binding.rows_home(resolved)[0]
        copies = {key: t.detach().clone() for key, t in resolved.buffers.items()}
        bound: dict[str, Tensor | None] = {
            "m." + key.removeprefix(prefix): t
            for key, t in {**copies, **(resolved.weights.params or {})}.items()
        }
        for key in binding.counter_keys(recomputed=True):
            bound["m." + key.removeprefix(prefix)] = None
        return GraphState(bound, copies)


CACHED = 8
"""Compiled graphs kept, the most recently used first. Each keeps its model alive (its graph
calls the model), so the cache is small: enough for the models one program recomputes
over and over."""

_CACHE: collections.OrderedDict[Any, Compiled] = collections.OrderedDict()


def cached(binding: Binding, forward: Forward, options: Mapping[str, Any]) -> Compiled:
    """The compiled statistics of ``binding``'s model for ``forward``: made once per model,
    recomputed layers, forward function and compile options (`CACHED` at most)."""
    key = (
        id(binding.target),
        tuple(binding.layers),
        _forward_key(forward),
        tuple(sorted(options.items())),
    )
    found = _CACHE.get(key)
    if found is None or found.binding.target is not binding.target:  # an id used again
        found = _CACHE[key] = Compiled(binding, forward, options)
        while len(_CACHE) > CACHED:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    found.binding = binding
    return found


def _forward_key(forward: Forward) -> Any:
    """A forward's identity for the cache: its code and what its closure holds, so that a
    lambda made anew for every call with the same contents finds its compiled graph."""
    code = getattr(forward, "__code__", None)
    if code is None:
        return forward
    cells = tuple(id(c.cell_contents) for c in (getattr(forward, "__closure__", None) or ()))
    return code, cells, getattr(forward, "__self__", None) and id(forward.__self__)  # type: ignore[attr-defined]
