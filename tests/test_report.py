"""``precisebn.report``: its figures, its table and its plain-dict form."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import Tensor

import precisebn
from precisebn._report import LayerMove, Report, eps_by_layer


def buffers(**layers: tuple[list[float], list[float]]) -> dict[str, Tensor]:
    """``{"<layer>.running_mean": mean, "<layer>.running_var": var}`` from float lists."""
    out = {}
    for layer, (mean, var) in layers.items():
        out[f"{layer}.running_mean"] = torch.tensor(mean)
        out[f"{layer}.running_var"] = torch.tensor(var)
    return out


def old_and_new() -> tuple[dict[str, Tensor], dict[str, Tensor], precisebn.RunInfo]:
    """Two layers whose statistics moved, the new ones with standard errors and n_eff."""
    gen = torch.Generator().manual_seed(0)
    old, new = {}, {}
    for layer, channels in (("conv.bn", 5), ("head", 3)):
        old[f"{layer}.running_mean"] = torch.randn(channels, generator=gen)
        old[f"{layer}.running_var"] = torch.rand(channels, generator=gen) + 0.5
        old[f"{layer}.num_batches_tracked"] = torch.tensor(7)
        new[f"{layer}.running_mean"] = torch.randn(channels, generator=gen)
        new[f"{layer}.running_var"] = torch.rand(channels, generator=gen) + 0.1
    stderr = {
        key: torch.rand(v.shape, generator=gen, dtype=torch.float64) for key, v in new.items()
    }
    info = precisebn.RunInfo(4, 64, None, stderr, {"conv.bn": 1234.5, "head": 60.0})
    return old, new, info


def by_hand(
    old: dict[str, Tensor],
    new: dict[str, Tensor],
    layer: str,
    eps: float,
    info: precisebn.RunInfo | None = None,
) -> dict[str, float]:
    """The figures of one layer, computed independently in float64 channel by channel."""
    om, ov = (old[f"{layer}.{stat}"].double().tolist() for stat in ("running_mean", "running_var"))
    nm, nv = (new[f"{layer}.{stat}"].double().tolist() for stat in ("running_mean", "running_var"))
    shifts = [abs(a - b) / math.sqrt(v + eps) for a, b, v in zip(om, nm, nv, strict=True)]
    ratios = [(a + eps) / (v + eps) for a, v in zip(ov, nv, strict=True)]
    figures = {
        "shift_mean": sum(shifts) / len(shifts),
        "shift_max": max(shifts),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    stderr = info.stderr if info is not None else {}
    if stderr:
        sm = stderr[f"{layer}.running_mean"].tolist()
        sv = stderr[f"{layer}.running_var"].tolist()
        figures["rel_error"] = max(
            max(m / math.sqrt(v + eps), s / (v + eps)) for m, s, v in zip(sm, sv, nv, strict=True)
        )
    return figures


def table_rows(text: str) -> list[str]:
    """The data lines of a report's table (between the rule and the legend)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"-"})
    legend = next(i for i, line in enumerate(lines) if line.startswith("  shift:"))
    return lines[rule + 1 : legend]


def test_figures_match_a_computation_by_hand() -> None:
    old, new, info = old_and_new()
    rep = precisebn.report(old, new, info=info, eps=1e-3)
    assert isinstance(rep, Report)
    assert [row.layer for row in rep] == ["conv.bn", "head"]
    assert [row.channels for row in rep] == [5, 3]
    for row in rep:
        wanted = by_hand(old, new, row.layer, eps=1e-3, info=info)
        got = {name: getattr(row, name) for name in wanted}
        assert got == pytest.approx(wanted, rel=1e-12)
        assert row.score == pytest.approx(
            max(
                wanted["shift_max"], *(abs(math.log(wanted[k])) for k in ("ratio_min", "ratio_max"))
            )
        )
    assert [row.n_eff for row in rep] == [1234.5, 60.0]


def test_float64_on_the_cpu_whatever_the_input_dtype() -> None:
    old, new, _ = old_and_new()
    half = {k: v.half() for k, v in old.items()}
    rep = precisebn.report(half, new)
    for row in rep:
        old_as_stored = {k: v.double() for k, v in half.items()}
        wanted = by_hand(old_as_stored, new, row.layer, eps=1e-5)
        assert row.shift_max == pytest.approx(wanted["shift_max"], rel=1e-12)
        assert isinstance(row.shift_max, float)


def test_without_info_there_are_no_errors() -> None:
    old, new, _ = old_and_new()
    rep = precisebn.report(old, new)
    assert [(row.rel_error, row.n_eff) for row in rep] == [(None, None)] * 2
    for line in table_rows(str(rep)):
        assert line.split()[6:8] == ["-", "-"]
    # An info without estimates (empty dicts) reads the same.
    bare = precisebn.RunInfo(4, 64, None, {}, {})
    assert precisebn.report(old, new, info=bare) == rep


def test_errors_and_n_eff_are_formatted() -> None:
    old, new, info = old_and_new()
    rep = precisebn.report(old, new, info=info)
    for line, row in zip(table_rows(str(rep)), rep, strict=True):
        assert row.rel_error is not None
        assert line.split()[6:8] == [f"{row.rel_error:.1e}", f"{row.n_eff:.1e}"]
        assert re.fullmatch(r"\d\.\de[+-]\d\d", line.split()[7])
    assert "rel. error: the worst channel's standard error" in str(rep)
    assert "n_eff: effective number of independent values per channel" in str(rep)


def test_eps_a_float_or_a_mapping() -> None:
    old, new, info = old_and_new()
    one = precisebn.report(old, new, info=info, eps=0.1)
    mapped = precisebn.report(old, new, info=info, eps={"conv.bn": 0.1, "head": 0.1})
    assert one == mapped
    partly = precisebn.report(old, new, info=info, eps={"conv.bn": 0.1})  # head gets 1e-5
    assert partly[0] == one[0]
    assert partly[1] == precisebn.report(old, new, info=info)[1]
    assert partly[1].shift_max == pytest.approx(by_hand(old, new, "head", 1e-5)["shift_max"])
    assert partly[1] != one[1]


def test_eps_of_a_model() -> None:
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.BatchNorm1d(2, eps=1e-3))
    )
    assert eps_by_layer(model) == {"0": 1e-5, "1.0": 1e-3}


def test_missing_layer_is_a_key_error() -> None:
    old, new, _ = old_and_new()
    del old["head.running_var"]
    with pytest.raises(KeyError, match=r"'head'.*head\.running_var"):
        precisebn.report(old, new)


def test_shape_mismatch_is_a_value_error() -> None:
    old, new, _ = old_and_new()
    old["head.running_mean"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"head\.running_mean.*\(4,\).*\(3,\)"):
        precisebn.report(old, new)


def test_extra_old_keys_and_layer_order() -> None:
    old, new, _ = old_and_new()
    old["other.running_mean"] = torch.zeros(2)
    reordered = {k: new[k] for k in sorted(new, reverse=True)}
    assert [row.layer for row in precisebn.report(old, reordered)] == ["head", "conv.bn"]


def test_a_model_that_is_a_bn_layer() -> None:
    old = {"running_mean": torch.zeros(2), "running_var": torch.ones(2)}
    new = {"running_mean": torch.ones(2), "running_var": torch.ones(2)}
    rep = precisebn.report(old, new, eps=0.0)
    assert rep[0].layer == ""
    assert table_rows(str(rep))[0].split()[0] == "<model>"


def test_to_dict_is_plain_and_matches_the_rows() -> None:
    old, new, info = old_and_new()
    for rep in (precisebn.report(old, new, info=info), precisebn.report(old, new)):
        plain = rep.to_dict()
        assert json.loads(json.dumps(plain)) == plain
        assert list(plain) == [row.layer for row in rep]
        for row in rep:
            entry = plain[row.layer]
            assert entry == {
                "channels": row.channels,
                "shift_mean": row.shift_mean,
                "shift_max": row.shift_max,
                "ratio_min": row.ratio_min,
                "ratio_max": row.ratio_max,
                "rel_error": row.rel_error,
                "n_eff": row.n_eff,
            }
            assert type(entry["channels"]) is int
            assert all(type(entry[k]) is float for k in ("shift_mean", "ratio_max"))


def test_the_largest_moves_are_flagged() -> None:
    new = buffers(**{layer: ([0.0] * 3, [1.0] * 3) for layer in ("a", "b", "c", "d")})
    old = {k: v.clone() for k, v in new.items()}
    old["b.running_mean"] += torch.tensor([0.0, 5.0, 0.0])  # five new stds on one channel
    old["d.running_var"] *= torch.tensor([1.0, 1.0, 30.0])  # |ln 30| = 3.4
    old["c.running_mean"] += 0.1
    rep = precisebn.report(old, new, eps=0.0, top=2)
    b = next(row for row in rep if row.layer == "b")
    assert (b.shift_max, b.shift_mean) == pytest.approx((5.0, 5.0 / 3))
    assert rep.flagged() == ["b", "d"]
    flagged = [line.split()[0] for line in table_rows(str(rep)) if line.endswith("*")]
    assert flagged == ["b", "d"]
    # By default: 3, at most a quarter of the layers, at least one.
    assert precisebn.report(old, new, eps=0.0).flagged() == ["b"]
    assert precisebn.report(old, new, eps=0.0, top=0).flagged() == []
    with pytest.raises(ValueError, match="top"):
        precisebn.report(old, new, top=-1)


@pytest.mark.parametrize(("layers", "flagged"), [(1, 1), (4, 1), (8, 2), (12, 3), (40, 3)])
def test_default_number_flagged(layers: int, flagged: int) -> None:
    new = buffers(**{f"l{i}": ([0.0], [1.0]) for i in range(layers)})
    old = buffers(**{f"l{i}": ([float(i)], [1.0]) for i in range(layers)})
    rep = precisebn.report(old, new)
    assert rep.flagged() == [f"l{i}" for i in range(layers - flagged, layers)]
    assert sum(line.endswith("*") for line in table_rows(str(rep))) == flagged


def test_table_is_aligned() -> None:
    old, new, info = old_and_new()
    old["a.much.longer.layer.name.running_mean"] = torch.full((300,), 1e6)
    old["a.much.longer.layer.name.running_var"] = torch.full((300,), 1e9)
    new = {
        **new,
        "a.much.longer.layer.name.running_mean": torch.zeros(300),
        "a.much.longer.layer.name.running_var": torch.full((300,), 1e-3),
    }
    text = str(precisebn.report(old, new, info=info, top=1))
    lines = text.splitlines()
    header, rule, rows = lines[0], lines[1], table_rows(text)
    assert len(rows) == 3
    assert rule == "  " + "-" * (len(header) - 2)
    unflagged = [row.removesuffix("  *") for row in rows]
    assert {len(line) for line in [header, *unflagged]} == {len(header)}
    assert [row.endswith("  *") for row in rows] == [False, False, True]
    # Every column is right-aligned under its header (the layer column left-aligned).
    ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", header)]
    for row in unflagged:
        row_ends = [m.end() for m in re.finditer(r"\S+", row)]
        assert row_ends[1:] == ends[1:]
        assert row.startswith("  ")
    assert header.split()[:2] == ["layer", "ch"]


def test_empty_report() -> None:
    rep = precisebn.report({}, {})
    assert len(rep) == 0
    assert rep.to_dict() == {}
    assert table_rows(str(rep)) == []


def test_report_is_a_sequence_of_rows() -> None:
    old, new, _ = old_and_new()
    rep = precisebn.report(old, new)
    assert isinstance(rep[0], LayerMove)
    assert rep[-1].layer == "head"
    assert rep[:1] == (rep[0],)
    assert list(rep) == list(rep.rows)
    assert "report" in precisebn.__all__
    assert "Report" not in precisebn.__all__
