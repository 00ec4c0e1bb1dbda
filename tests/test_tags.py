"""The tag's interception, whatever form the batch_norm call arrives in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import precisebn
from precisebn._binding import Weights
from precisebn._tags import Call, Tag


class Rows:
    """A sink that hands out fresh rows and keeps every call with them."""

    def __init__(self) -> None:
        self.records: list[tuple[Call, torch.Tensor, torch.Tensor]] = []

    def rows(
        self, call: Call, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = torch.zeros(2, len(call.span), dtype=dtype, device=device).unbind(0)
        self.records.append((call, mean, var))
        return mean, var

    def degenerate(self, call: Call, shape: tuple[int, ...]) -> None:
        raise AssertionError("no call here is degenerate")

    def output(self, call: Call, out: torch.Tensor, *args: object) -> torch.Tensor:
        return out


def test_tag_intercepts_positional_and_keyword_forms_alike() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(0.5)
    binding = precisebn.recorder(model).binding
    binding._refresh_tags(binding.resolve(Weights()).buffers)
    tag, var = binding._tags["0.running_mean"], binding._tags["0.running_var"]
    assert isinstance(tag, Tag)
    x = torch.randn(6, 3) * 2 + 1
    weight, bias = torch.rand(3), torch.randn(3)
    outputs = []
    for func, args, kwargs in [
        (F.batch_norm, (x, tag, var), {"weight": weight, "bias": bias, "eps": 1e-3}),
        (F.batch_norm, (x, tag, var, weight, bias, False, 0.1, 1e-3), {}),
        (torch.batch_norm, (x, weight, bias, tag, var, False, 0.1, 1e-3, True), {}),
    ]:
        binding.state.sink = sink = Rows()
        outputs.append(Tag.__torch_function__(func, (Tag,), args, kwargs))
        ((call, mean, var_row),) = sink.records
        assert call == Call("0", 6, range(3), True)
        torch.testing.assert_close(mean, x.mean(0))
        torch.testing.assert_close(var_row, x.var(0))
    expected = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-3)
    for out in outputs:
        assert torch.equal(out, expected)
    with torch._C.DisableTorchFunctionSubclass():
        assert torch.equal(tag, torch.full((3,), 0.5))  # the tag holds the caller's values
