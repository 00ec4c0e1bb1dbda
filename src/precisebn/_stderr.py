"""Standard errors of the pooled statistics, from the spread of the batches' moments.

The recomputed ``running_mean`` of a channel is a ratio ``Σ y_k / Σ n_k`` over batches
``k``, with ``y_k`` the sum of the batch's ``n_k`` values; ``running_var`` is
``Σ z_k / Σ n_k`` up to the factor ``N / (N - 1)``, with ``z_k`` the batch's sum of
squared deviations from the pooled mean ``mu``. Treating the batches as exchangeable
draws (a shuffled loader), the batch-means (cluster) estimator of a ratio's variance is

    V = B / (B - 1) * Σ (y_k - r n_k)**2 / N**2,

with ``B`` the batches that reached the channel and ``N = Σ n_k``. The values inside one
batch may be correlated (neighbouring pixels of one image, positions of one sequence):
the estimator only assumes that batches are independent of each other, which is why it
reports fewer effective values than ``N`` for spatially correlated features.

For the mean, ``y_k - mu n_k = n_k (m_k - mu)``; for the variance, with the ratio
``r = M2 / N``, the terms are ``z_k - r n_k`` (the error of ``mu`` itself enters only at
second order). Both expand into sums over batches that a fold can add block by block:
per channel, about a reference point ``c`` with ``e_k = m_k - c`` and
``t_k = Σ_i (x_i - c)**2 = m2_k + n_k e_k**2``,

    B,  Σ n_k**2,  Σ n_k**2 e_k,  Σ n_k**2 e_k**2,  Σ t_k**2,  Σ t_k n_k e_k,  Σ t_k n_k.

Moving the reference point is a polynomial identity in the shift (`recenter`), so two sets
of sums merge exactly (up to float64 rounding) and a distributed reduction moves every
rank's sums to the global mean and adds them. The sums are evaluated about the pooled
mean itself, where they are best conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from precisebn._layers import STAT_NAMES, buffer_key
from precisebn._layout import Layout
from precisebn._moments import Moments, Stats, joined

__all__ = [
    "MIN_BATCHES",
    "Errors",
    "Spread",
    "Spreads",
    "accumulate",
    "evaluate",
    "recenter",
    "relative_errors",
    "standard_errors",
    "terms",
]

MIN_BATCHES = 16
"""The fewest batches a ``tol=`` run stops after. The batch-means estimate of a standard
error from ``B`` batches has ``B - 1`` degrees of freedom: with 16, the estimate is within
about 18% (``1 / sqrt(2 * 15)``) of the true standard error, and a 95% interval from it
(``1.96`` standard errors) covers as a t-interval of 15 degrees of freedom would (about
93%), close enough for a stopping rule. Fewer batches let the run stop on an
underestimated error."""


class Spread(NamedTuple):
    """Per-channel sums over batches about ``center`` (float64 ``[C]`` each); see the module."""

    center: Tensor
    batches: Tensor
    n2: Tensor
    n2e: Tensor
    n2e2: Tensor
    t2: Tensor
    tne: Tensor
    tn: Tensor


Spreads = dict[str, Spread]
"""`Spread` per layer name, laid out like a `precisebn.Stats`."""


def terms(moments: Moments, center: Tensor) -> Spread:
    """One batch's contribution: the sums of a single batch with ``moments``, about ``center``.

    ``moments.count`` may be a scalar or per channel (0 on channels the batch missed).
    """
    n = moments.count.expand_as(moments.mean)
    e = torch.where(n > 0, moments.mean - center, 0.0)
    t = moments.m2 + n * e.square()
    n2 = n.square()
    return Spread(
        center, (n > 0).to(torch.float64), n2, n2 * e, n2 * e.square(), t.square(), t * n * e, t * n
    )


def accumulate(a: Spread, b: Spread, *, sign: float = 1.0) -> Spread:
    """``a + sign * b``, both about ``a.center`` (``b`` is moved there first)."""
    b = recenter(b, a.center)
    return Spread(a.center, *(x + sign * y for x, y in zip(a[1:], b[1:], strict=True)))


def recenter(s: Spread, center: Tensor) -> Spread:
    """The same sums about another reference point: with ``d = s.center - center`` each
    ``e_k`` grows by ``d`` and each ``t_k`` by ``2 d n_k e_k + d**2 n_k``."""
    d = s.center - center
    d2 = d.square()
    return Spread(
        center,
        s.batches,
        s.n2,
        s.n2e + d * s.n2,
        s.n2e2 + 2 * d * s.n2e + d2 * s.n2,
        s.t2
        + 4 * d2 * s.n2e2
        + d2.square() * s.n2
        + 4 * d * s.tne
        + 2 * d2 * s.tn
        + 4 * d * d2 * s.n2e,
        s.tne + d * s.tn + 2 * d * s.n2e2 + 3 * d2 * s.n2e + d * d2 * s.n2,
        s.tn + 2 * d * s.n2e + d2 * s.n2,
    )


class Errors(NamedTuple):
    """Standard errors of one layer's recomputed buffers, per channel (float64 ``[C]``)."""

    mean: Tensor
    var: Tensor
    n_eff: Tensor


def evaluate(m: Moments, s: Spread) -> Errors:
    """The standard errors of ``running_mean`` and ``running_var`` (unbiased), and the
    effective number of values ``var / stderr(mean)**2``.

    Infinite where fewer than two batches reached a channel; NaN where fewer than two
    values did (those channels keep their old buffers).
    """
    s = recenter(s, m.mean)
    n = m.count.expand_as(m.mean)
    b = s.batches
    scale = torch.where(b > 1, b / (b - 1).clamp_min(1.0), math.inf) / n.square().clamp_min(1.0)
    r = m.m2 / n.clamp_min(1.0)
    mean_v = (s.n2e2 * scale).clamp_min(0.0)
    var_v = ((s.t2 - 2 * r * s.tn + r.square() * s.n2) * scale).clamp_min(0.0)
    var = m.m2 / (n - 1).clamp_min(1.0)
    unbias = n / (n - 1).clamp_min(1.0)
    se_mean = mean_v.sqrt()
    se_var = var_v.sqrt() * unbias
    n_eff = torch.where(se_mean > 0, var / se_mean.square(), math.inf)
    unreached = n < 2
    nan = torch.full_like(se_mean, math.nan)
    return Errors(
        torch.where(unreached, nan, torch.where(b > 1, se_mean, math.inf)),
        torch.where(unreached, nan, torch.where(b > 1, se_var, math.inf)),
        torch.where(unreached, nan, n_eff),
    )


def relative_errors(m: Moments, errors: Errors) -> Tensor:
    """Per channel, the larger of ``stderr(mean) / std`` and ``stderr(var) / var``; 0 where
    both the error and the variance are 0 (a constant channel), NaN where no value was."""
    var = m.m2 / (m.count.expand_as(m.mean) - 1).clamp_min(1.0)
    rel_mean = _ratio(errors.mean, var.sqrt())
    rel_var = _ratio(errors.var, var)
    return torch.maximum(rel_mean, rel_var)


def _ratio(error: Tensor, scale: Tensor) -> Tensor:
    return torch.where(error == 0, 0.0, error / scale)


def standard_errors(
    stats: Stats, spreads: Spreads, *, devices: Mapping[str, torch.device] | None = None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per buffer key the standard errors, per layer the median ``n_eff`` over channels, for
    the layers of ``stats`` that ``spreads`` holds.

    Each error is on the device ``devices`` gives for its key (when given).
    """
    names = [layer for layer in stats if layer in spreads]
    if not names:
        return {}, {}
    # All layers end to end: a few operations whatever the number of layers.
    layout = Layout.of({name: stats[name].mean for name in names})
    moments = joined({name: stats[name] for name in names}, layout)
    device = moments.mean.device
    fields = range(len(Spread._fields))
    sums = Spread(*(layout.join(spreads[n][i].to(device) for n in names) for i in fields))
    errors = evaluate(moments, sums)
    out: dict[str, Tensor] = {}
    for stat, values in zip(STAT_NAMES, (errors.mean, errors.var), strict=True):
        for layer, value in zip(names, layout.split(values), strict=True):
            key = buffer_key(layer, stat)
            out[key] = value.to(devices[key]) if devices is not None else value
    per_layer = pad_sequence(layout.split(errors.n_eff), padding_value=math.nan)
    medians = per_layer.nanmedian(dim=0).values.tolist()
    return out, dict(zip(names, medians, strict=True))
