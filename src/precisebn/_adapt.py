"""Test-time adaptation done exactly: the source statistics as a prior, merged with the
target data's moments by the same algebra as every other fold.

The source buffers count as ``N`` pseudo-values per channel with mean ``running_mean`` and
variance ``running_var``: moments ``(N, mean, N * var)``. Merged with the target's
``(n, mean_t, m2_t)`` by Chan's formulas, the pooled values have the mean
``w * mean + (1 - w) * mean_t`` with ``w = N / (N + n)``, and the variance (about that mean,
each group's mean square deviation taken over its own count)

    w * var + (1 - w) * var_t + w * (1 - w) * (mean - mean_t) ** 2.

The linear mix of the common test-time adaptation code, ``w * var + (1 - w) * var_t``,
leaves out the last term, the spread between the two groups' means, so it is smaller than
the variance of the data it claims to describe whenever the target's mean moved.

How strong the source counts (`Prior`): as ``n_source`` samples, ``N`` values per channel
being ``n_source`` times the layer's values per target sample; or as a share ``w`` of every
statistic (``prior=w``, or ``alpha = 1 - w``), ``N = n * w / (1 - w)``; or not at all (full
adaptation: the target's statistics alone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import optree
import torch
from torch import Tensor, nn

from precisebn._batches import Forward, to_device
from precisebn._binding import Weights, bind
from precisebn._fold import Fold
from precisebn._layers import MEAN, VAR, LayerSelector, buffer_key
from precisebn._moments import Moments, Stats, merge_layer
from precisebn._recompute import Result, run_model, run_options
from precisebn._recorder import Recorder, check_followed
from precisebn._tags import Call
from precisebn._vmap import check_unbatched

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Adapter", "Prior", "adapted_stats", "adapter", "prior_of", "with_prior"]

Adapts = Literal["both", "mean", "var"]


class Prior(NamedTuple):
    """How much the source statistics count against the target's.

    Attributes:
        n_source: the source as this many samples (``None``: see ``weight``).
        weight: the source's share ``w = N / (N + n)`` of every statistic (0: full
            adaptation, the target's statistics alone).
        adapts: which statistics adapt: ``"both"``, ``"mean"`` (the variance stays the
            source's) or ``"var"`` (the mean stays the source's; the variance is the
            pooled values' mean square deviation from it).
    """

    n_source: float | None = None
    weight: float = 0.0
    adapts: Adapts = "both"

    def pseudo_count(self, n: Tensor, per_sample: Tensor | float) -> Tensor:
        """The source's pseudo-count per channel against ``n`` target values, the layer
        seeing ``per_sample`` values per channel of each sample."""
        if self.n_source is not None:
            return torch.zeros_like(n) + self.n_source * per_sample
        return n * (self.weight / (1.0 - self.weight))


def prior_of(
    *,
    n_source: float | None = None,
    prior: float | None = None,
    alpha: float | None = None,
    adapts: str = "both",
) -> Prior:
    """The `Prior` of at most one of ``n_source``, ``prior`` or ``alpha`` (none: full
    adaptation).

    Raises:
        ValueError: more than one is given, or one is out of range.

    Example:
        >>> prior_of(alpha=0.1).weight, prior_of(n_source=16).n_source, prior_of().weight
        (0.9, 16.0, 0.0)
    """
    given = {k: v for k, v in {"n_source": n_source, "prior": prior, "alpha": alpha}.items()
             if v is not None}  # fmt: skip
    if len(given) > 1:
        raise ValueError(f"give at most one of n_source, prior and alpha, got {sorted(given)}")
    if adapts not in ("both", "mean", "var"):
        raise ValueError(f"adapts must be 'both', 'mean' or 'var', got {adapts!r}")
    mode: Adapts = adapts  # type: ignore[assignment]
    if n_source is not None:
        if not n_source >= 0:
            raise ValueError(f"n_source must be a number of samples >= 0, got {n_source!r}")
        return Prior(n_source=float(n_source), adapts=mode)
    share = prior if prior is not None else (1.0 - alpha if alpha is not None else 0.0)
    if not 0.0 <= share < 1.0:
        name, value = ("prior", prior) if prior is not None else ("alpha", alpha)
        raise ValueError(f"{name} must be in [0, 1) for prior, (0, 1] for alpha, got {value!r}")
    return Prior(weight=float(share), adapts=mode)


def with_prior(
    source: tuple[Tensor, Tensor], target: Moments, prior: Prior, per_sample: Tensor | float
) -> Moments:
    """The target's moments with the source's pseudo-values pooled in (a layer seeing
    ``per_sample`` values per channel of each sample), then what ``prior.adapts`` keeps
    of the source."""
    mean_s, var_s = (t.detach().to(torch.float64) for t in source)
    n = target.count.expand_as(target.mean)
    count = prior.pseudo_count(n, per_sample)
    pooled = merge_layer(Moments(count, mean_s, var_s * count), target)
    if prior.adapts == "mean":  # the source's variance, about the adapted mean
        return Moments(pooled.count, pooled.mean, var_s * (pooled.count - 1))
    if prior.adapts == "var":  # the source's mean, the pooled values' deviations from it
        shift = pooled.count * (pooled.mean - mean_s).square()
        return Moments(pooled.count, mean_s.clone(), pooled.m2 + shift)
    return pooled


def adapted_stats(
    source: Mapping[str, Tensor], target: Stats, *, prior: Prior, samples: float
) -> Stats:
    """Per layer of ``target``, its moments merged with the source buffers' prior.

    Args:
        source: the source buffers, keyed like ``model.named_buffers()``.
        target: the target data's moments per layer (from a fold).
        prior: how much the source counts.
        samples: how many target samples the moments come from.
    """
    out = {}
    for layer, m in target.items():
        pair = (source[buffer_key(layer, MEAN)], source[buffer_key(layer, VAR)])
        per_sample = m.count.expand_as(m.mean) / max(samples, 1.0)
        out[layer] = with_prior(pair, m, prior, per_sample)
    return out


class _AdaptingSink:
    """A fold of one row for the batch's moments, and calls that normalise with the
    source prior merged with the state and the call's own moments."""

    def __init__(
        self, fold: Fold, state: Stats, source: Mapping[str, Tensor], prior: Prior
    ) -> None:
        self.fold, self.state, self.source, self.prior = fold, state, source, prior
        self._written: tuple[Tensor, Tensor] | None = None

    def rows(self, call: Call, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        self._written = self.fold.rows(call, dtype, device)
        return self._written

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        self._written = None
        self.fold.degenerate(call, shape)

    def output(
        self, call: Call, out: Tensor, input: Tensor, weight: Any, bias: Any, eps: float
    ) -> Tensor:
        index = slice(call.span.start, call.span.stop, call.span.step)
        have = self.state[call.layer]
        count = have.count if have.count.dim() == 0 else have.count[index]
        target = Moments(count, have.mean[index], have.m2[index])
        if self._written is not None:  # this call's batch moments, as the kernel left them
            mean, var = (t.to(torch.float64) for t in self._written)
            target = merge_layer(target, Moments(target.count.new_tensor(call.count), mean,
                                                 var * (call.count - 1)))  # fmt: skip
        self._written = None
        source = tuple(self.source[buffer_key(call.layer, stat)][index] for stat in (MEAN, VAR))
        per_sample = call.count / max(input.shape[0], 1)
        used = with_prior((source[0], source[1]), target, self.prior, per_sample)
        have_values = used.count.expand_as(used.mean) >= 2
        mean = torch.where(have_values, used.mean, source[0].to(torch.float64))
        var = torch.where(
            have_values, used.m2 / (used.count - 1).clamp_min(1.0), source[1].to(torch.float64)
        )
        dtype = source[0].dtype
        return torch.batch_norm(
            input, weight, bias, mean.to(dtype), var.to(dtype), False, 0.0, eps, False
        )


class Adapter:
    """Prediction-time BatchNorm with the source statistics as an exact prior (see
    `precisebn.adapter`). Its methods are pure."""

    def __init__(self, recorder: Recorder, prior: Prior) -> None:
        self.recorder, self.prior = recorder, prior

    def init(self) -> Stats:
        """A state with no target data yet (pass it to every `predict` for episodic
        adaptation, which starts from the source statistics on every batch)."""
        return self.recorder.init()

    def predict(
        self,
        state: Stats,
        batch: Any,
        *,
        params: Mapping[str, Tensor] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
    ) -> tuple[Any, Stats]:
        """Run ``batch`` with every recomputed layer normalising with the source prior
        merged with ``state`` and the batch's own moments; return the output and the state
        with the batch's moments folded in (the source prior is not: it is merged anew at
        every call, against the target values seen so far).

        Autograd is left as the caller has it (the statistics themselves are constants), so
        the output can be differentiated, as entropy-minimising adaptation needs.
        """
        rec = self.recorder
        binding = rec.binding
        resolved = binding.resolve(Weights(params, buffers))
        fold = rec.fold(resolved, rows=1, errors=False, start=state, check=False)
        source = binding.bn_buffers(resolved)
        sink = _AdaptingSink(fold, state, source, self.prior)
        check_unbatched(optree.tree_leaves(batch, none_is_leaf=True))
        placed = to_device(batch, resolved.device)

        def body(models: list[nn.Module]) -> Any:
            # A batch of one value per channel is not folded, and predicts all the same.
            output, _ = rec.run_batch(models[0], placed, fold, index=0)
            return output

        output = bind([(binding, resolved, sink)], body)
        check_followed(binding.reads, fold.recorded)
        return output, fold.result()


def adapter(
    model: nn.Module,
    *,
    n_source: float | None = None,
    prior: float | None = None,
    alpha: float | None = None,
    adapts: str = "both",
    layers: LayerSelector = None,
    forward: Forward | None = None,
) -> Adapter:
    """Prediction-time BatchNorm adaptation with the source statistics as an exact prior.

    Each `Adapter.predict` normalises every recomputed layer with the model's buffers
    counted as a prior (see `precisebn.adapt` for ``n_source``, ``prior``, ``alpha`` and
    ``adapts``), merged exactly with the target values seen so far (the state) and the
    batch's own. Pass ``adapter.init()`` on every batch for episodic adaptation (the batch
    at hand against the source alone, as prediction-time BN does), or carry the state
    from batch to batch for online adaptation.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
        >>> tta = precisebn.adapter(model, prior=0.5)
        >>> state = tta.init()
        >>> for batch in torch.randn(3, 8, 3) + 1:
        ...     out, state = tta.predict(state, batch)
        >>> out.shape, state["1"].count.item()
        (torch.Size([8, 4]), 24.0)
    """
    settings = prior_of(n_source=n_source, prior=prior, alpha=alpha, adapts=adapts)
    return Adapter(Recorder(model, layers=layers, forward=forward), settings)


@overload
def adapt(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    n_source: float | None = ...,
    prior: float | None = ...,
    alpha: float | None = ...,
    adapts: str = ...,
    num_batches: int = ...,
    layers: LayerSelector = ...,
    forward: Forward | None = ...,
    params: Mapping[str, Tensor] | None = ...,
    buffers: Mapping[str, Tensor] | None = ...,
    progress: bool = ...,
    process_group: ProcessGroup | None = ...,
    distributed: bool = ...,
    compile: bool | Mapping[str, Any] | None = ...,
    return_info: Literal[False] = ...,
) -> dict[str, Tensor]: ...


@overload
def adapt(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    n_source: float | None = ...,
    prior: float | None = ...,
    alpha: float | None = ...,
    adapts: str = ...,
    num_batches: int = ...,
    layers: LayerSelector = ...,
    forward: Forward | None = ...,
    params: Mapping[str, Tensor] | None = ...,
    buffers: Mapping[str, Tensor] | None = ...,
    progress: bool = ...,
    process_group: ProcessGroup | None = ...,
    distributed: bool = ...,
    compile: bool | Mapping[str, Any] | None = ...,
    return_info: Literal[True],
) -> Result: ...


def adapt(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    n_source: float | None = None,
    prior: float | None = None,
    alpha: float | None = None,
    adapts: str = "both",
    num_batches: int = 200,
    layers: LayerSelector = None,
    forward: Forward | None = None,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    process_group: ProcessGroup | None = None,
    distributed: bool = True,
    compile: bool | Mapping[str, Any] | None = None,
    return_info: bool = False,
) -> dict[str, Tensor] | Result:
    """Adapt BatchNorm statistics to target data exactly, the source buffers as a prior.

    Pools every value the target ``loader`` sends into each recomputed layer, as
    `precisebn.recompute_bn_buffers` does, and merges the source buffers in as ``N``
    pseudo-values per channel with mean ``running_mean`` and variance ``running_var``
    (Chan's formulas, in float64). With ``w = N / (N + n)`` against the target's ``n``
    values, the adapted mean is ``w * mean_s + (1 - w) * mean_t`` and the adapted variance
    ``w * var_s + (1 - w) * var_t + w * (1 - w) * (mean_s - mean_t) ** 2``: the variance
    of the pooled values, which the linear mix of common test-time adaptation code misses
    by the last term. (``var_t`` is the target values' mean square deviation; the result's
    ``running_var`` is the pooled sum of squared deviations over ``N + n - 1``, so that with
    no prior it is exactly what `precisebn.recompute_bn_buffers` gives on the target data.)

    At most one of ``n_source``, ``prior`` and ``alpha`` says how strongly the source
    counts; with none, the target's statistics replace the source's (full adaptation).

    Args:
        model: the source model; its buffers are the prior and are not changed.
        loader: batches of target data.
        n_source: the source as this many samples: ``N`` is ``n_source`` times the values
            per channel each target sample gives the layer (the "N" of ``N / (N + n)``).
        prior: the source's share ``w`` of every adapted statistic, in ``[0, 1)``.
        alpha: the target's share ``1 - w``, in ``(0, 1]`` (the ``alpha`` of alpha-BN).
        adapts: ``"both"``, ``"mean"`` (the variance stays the source's) or ``"var"``
            (the mean stays the source's, and the variance is the pooled values' mean
            square deviation from it).
        num_batches: the most target batches to use.
        layers: as for `precisebn.recompute_bn_buffers`.
        forward: as for `precisebn.recompute_bn_buffers`.
        params: as for `precisebn.recompute_bn_buffers`.
        buffers: as for `precisebn.recompute_bn_buffers`.
        progress: as for `precisebn.recompute_bn_buffers`.
        process_group: as for `precisebn.recompute_bn_buffers`; the target's moments are
            pooled over the ranks first, so every rank adapts alike.
        distributed: as for `precisebn.recompute_bn_buffers`.
        compile: as for `precisebn.recompute_bn_buffers`.
        return_info: also return the `RunInfo` of the target run (its standard errors
            are those of the target's statistics).

    Returns:
        The adapted buffers, keyed like the model's, with the dtype and device of the
        buffers they replace (and the `RunInfo` with ``return_info``).

    Raises:
        ValueError: more than one of ``n_source``, ``prior``, ``alpha``, or one out of range;
            and the errors of `precisebn.recompute_bn_buffers`.

    Example:
        >>> import torch, precisebn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> shifted = [torch.randn(32, 3) + 3 for _ in range(4)]
        >>> full = precisebn.adapt(model, shifted)
        >>> half = precisebn.adapt(model, shifted, prior=0.5)
        >>> mean = full["1.running_mean"]
        >>> torch.allclose(half["1.running_mean"], mean / 2)  # the source's mean is 0
        True
    """
    settings = prior_of(n_source=n_source, prior=prior, alpha=alpha, adapts=adapts)

    def transform(source: Mapping[str, Tensor], stats: Stats, samples: int) -> Stats:
        return adapted_stats(source, stats, prior=settings, samples=samples)

    options = run_options(
        num_batches=num_batches,
        tol=None,
        layers=layers,
        forward=forward,
        progress=progress,
        process_group=process_group,
        distributed=distributed,
        compile=compile,
        return_info=return_info,
    )._replace(transform=transform)
    result = run_model(model, loader, Weights(params, buffers), options)
    return result if return_info else result[0]
