"""The tag's interception, whatever form the batch_norm call arrives in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from precisebn._capture import RecordList, Runner, _Tag


def test_tag_intercepts_positional_and_keyword_forms_alike() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    runner = Runner(model)
    tag = runner._swap["0.running_mean"]
    assert isinstance(tag, _Tag)
    x = torch.randn(6, 3) * 2 + 1
    weight, bias = torch.rand(3), torch.randn(3)
    outputs = []
    for args, kwargs in [
        ((x, tag, torch.ones(3)), {"weight": weight, "bias": bias, "eps": 1e-3}),
        ((x, tag, torch.ones(3), weight, bias, False, 0.1, 1e-3), {}),
    ]:
        runner.sink = sink = RecordList()
        outputs.append(_Tag.__torch_function__(F.batch_norm, (_Tag,), args, kwargs))
        (record,) = sink.records
        assert record.count == 6
        torch.testing.assert_close(record.mean, x.mean(0))
        torch.testing.assert_close(record.var, x.var(0))
    expected = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-3)
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert torch.equal(tag, torch.zeros(3))  # the tag itself is never written
