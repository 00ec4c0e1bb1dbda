"""The scripts under examples/ run, train, and agree with the library."""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import precisebn

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / "functional_training.py"), run_name="example")


@pytest.fixture(scope="module")
def trained(example: dict[str, Any]) -> Iterator[dict[str, Any]]:
    # The network is tiny: one thread is several times faster than two on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield example["main"](epochs=2)
    finally:
        torch.set_num_threads(threads)


def test_loss_goes_down(trained: dict[str, Any]) -> None:
    first, *_, last = trained["epoch_losses"]
    assert last < 0.5 * first
    assert trained["precise_accuracy"] > 0.9


def test_precise_buffers_match_the_library(
    example: dict[str, Any], trained: dict[str, Any]
) -> None:
    model, params, ema = trained["model"], trained["params"], trained["ema_buffers"]
    loader = example["batches"](trained["train"], 32, seed=0)
    expected, info = precisebn.recompute_bn_buffers(
        model, loader, params=params, buffers=ema, return_info=True
    )
    assert info.num_samples == len(trained["train"][1])
    precise = trained["precise_buffers"]
    # The same float64 statistics up to rounding (recompute pools batches in blocks, the
    # example's loop one at a time): at most a couple of float32 ulps apart.
    for key, value in expected.items():
        torch.testing.assert_close(precise[key], value, rtol=2.5e-7, atol=1e-12)
    # The recomputed statistics differ from the running averages the loop kept.
    assert not torch.equal(precise["1.running_var"], ema["1.running_var"])

    images = trained["test"][0]
    predict = example["predict"]
    torch.testing.assert_close(
        predict(model, params, precise, images),
        predict(model, params, {**ema, **expected}, images),
        rtol=0,
        atol=0,
    )


def test_model_object_is_never_written(trained: dict[str, Any]) -> None:
    model = trained["model"]
    assert not model.training
    assert torch.count_nonzero(model[1].running_mean) == 0
    assert torch.all(model[1].running_var == 1)
    assert int(model[1].num_batches_tracked) == 0


def test_grad_and_value_through_capture_matches_eager_autograd(example: dict[str, Any]) -> None:
    torch.manual_seed(1)
    model = example["make_model"]()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    batch = (torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,)))

    grad_fn = torch.func.grad_and_value(
        lambda p, b, x: example["loss_fn"](precisebn.recorder(model.eval()), p, b, x),
        has_aux=True,
    )
    grads, (loss, moments) = grad_fn(params, buffers, batch)

    model.train()
    eager = F.cross_entropy(model(batch[0]), batch[1])
    eager.backward()
    torch.testing.assert_close(loss, eager.detach())
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad)
    # The moments are the batch statistics the eager forward folded into the buffers
    # (momentum 0.1 from mean 0 and variance 1).
    for layer in ("1", "4"):
        count, mean, m2 = moments[layer]
        bn = model.get_submodule(layer)
        torch.testing.assert_close(bn.running_mean, 0.1 * mean.float())
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * (m2 / (count - 1)).float())
    assert moments["1"].count.item() == 12 * 8 * 8
    assert moments["4"].count.item() == 12 * 4 * 4


@pytest.fixture(scope="module")
def adaptation() -> Iterator[tuple[dict[str, Any], dict[str, dict[str, float]]]]:
    script = runpy.run_path(str(EXAMPLES / "test_time_adaptation.py"), run_name="example")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield script, script["main"]()
    finally:
        torch.set_num_threads(threads)


def test_adaptation_example_scores_every_shift_and_method(
    adaptation: tuple[dict[str, Any], dict[str, dict[str, float]]],
) -> None:
    script, table = adaptation
    assert list(table) == ["clean", "noise", "contrast", "blur"]
    for row in table.values():
        assert list(row) == ["none", "linear mix", "exact prior", "full"]
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert table["clean"]["none"] > 0.9  # the network learned the clean digits
    # A shift of the inputs' statistics is what adapting BN is for: the batch's own
    # statistics recover much of what the source statistics lose.
    assert table["contrast"]["full"] > table["contrast"]["none"] + 0.2
    printed = script["format_table"](table)
    assert printed.splitlines()[0].split() == [
        "shift",
        "none",
        "linear",
        "mix",
        "exact",
        "prior",
        "full",
    ]


def test_adaptation_example_exact_prior_is_the_library_merge(
    adaptation: tuple[dict[str, Any], dict[str, dict[str, float]]],
) -> None:
    """The example's linear mix and the library's exact merge differ by the between-group
    term only: with the batch's mean equal to the source's, they normalise alike."""
    script, _ = adaptation
    conv_bn = torch.nn.Sequential(*list(script["make_model"]().children())[:2]).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():  # give the source the statistics of this very batch
        features = conv_bn[0](x)
        conv_bn[1].running_mean.copy_(features.mean(dim=(0, 2, 3)))
        conv_bn[1].running_var.copy_(features.var(dim=(0, 2, 3), correction=0))
        want = script["linear_mix"](conv_bn, 0.5)(x)
    exact = precisebn.adapter(conv_bn, prior=0.5)
    got, _ = exact.predict(exact.init(), x)
    # No between-group term; the exact variance carries the factor (N + n) / (N + n - 1).
    torch.testing.assert_close(got, want, rtol=2 / (8 * 64), atol=1e-5)
