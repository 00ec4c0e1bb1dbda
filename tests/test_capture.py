"""The tag's interception, whatever form the batch_norm call arrives in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from precisebn._capture import RecordList, Runner
from precisebn._tags import Tag


def test_tag_intercepts_positional_and_keyword_forms_alike() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(0.5)
    runner = Runner(model)
    tag, var = runner._tags["0.running_mean"], runner._tags["0.running_var"]
    assert isinstance(tag, Tag)
    x = torch.randn(6, 3) * 2 + 1
    weight, bias = torch.rand(3), torch.randn(3)
    outputs = []
    for func, args, kwargs in [
        (F.batch_norm, (x, tag, var), {"weight": weight, "bias": bias, "eps": 1e-3}),
        (F.batch_norm, (x, tag, var, weight, bias, False, 0.1, 1e-3), {}),
        (torch.batch_norm, (x, weight, bias, tag, var, False, 0.1, 1e-3, True), {}),
    ]:
        runner.sink = sink = RecordList()
        outputs.append(Tag.__torch_function__(func, (Tag,), args, kwargs))
        (record,) = sink.records
        assert record.call.count == 6
        assert record.call.factor == 0.1
        assert not record.call.training
        torch.testing.assert_close(record.mean, x.mean(0))
        torch.testing.assert_close(record.var, x.var(0))
    expected = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-3)
    for out in outputs:
        assert torch.equal(out, expected)
    with torch._C.DisableTorchFunctionSubclass():
        assert torch.equal(tag, torch.full((3,), 0.5))  # the tag holds the caller's values
