"""CUDA: agreement with the CPU and no host-device synchronisation per batch."""

from __future__ import annotations

import pytest
import torch

import precisebn

from models import SmallCNN
from reference import assert_matches, pooled_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_matches_reference_and_stays_on_device() -> None:
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    batches = [torch.randn(n, 3, 16, 16) * 2 + 1 for n in (16, 16, 7)]
    new = precisebn.recompute_bn_buffers(model, batches)
    assert all(v.device.type == "cuda" for v in new.values())
    assert_matches(new, pooled_inputs(model, [b.cuda() for b in batches]))


def test_cuda_recorder_loop_matches_reference_and_recompute() -> None:
    """The recorder's update loop on CUDA (cuDNN's kernel) against the float64 reference."""
    torch.manual_seed(1)
    model = SmallCNN().cuda()
    batches = [torch.randn(16, 3, 16, 16, device="cuda") * 2 + 1 for _ in range(9)]
    recorder = precisebn.recorder(model)
    stats = recorder.init()
    for batch in batches:
        stats = recorder.update(stats, batch)
    new = recorder.finalize(stats)
    assert all(v.device.type == "cuda" for v in new.values())
    assert_matches(new, pooled_inputs(model, batches))
    for key, value in precisebn.recompute_bn_buffers(model, batches).items():
        torch.testing.assert_close(new[key], value, rtol=1e-5, atol=1e-6)


def test_no_sync_per_batch() -> None:
    model = SmallCNN().cuda()
    model.bn1.momentum = None
    batches = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(4)]
    stats = precisebn.init(precisebn.bn_buffers(model))
    stats = precisebn.update(stats, model, batches[0])  # warm-up: first-call set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            stats = precisebn.update(stats, model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats["bn1"].count.item() == 4 * 8 * 16 * 16


def test_recompute_loop_never_syncs() -> None:
    """From the second batch to the last, the run makes no host-device synchronisation."""
    model = SmallCNN().cuda()
    batches = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(12)]
    precisebn.recompute_bn_buffers(model, batches)  # warm-up: first-call set-up may sync

    def guarded():
        yield batches[0]
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches[1:]
        finally:  # lifted once the loader is exhausted, before the result is read back
            torch.cuda.set_sync_debug_mode("default")

    _, info = precisebn.recompute_bn_buffers(
        model, guarded(), num_batches=len(batches) + 1, return_info=True
    )
    assert info.num_batches == len(batches)


def test_cuda_nan_is_reported_after_a_loop_that_never_syncs() -> None:
    model = SmallCNN().cuda()
    batches = [torch.randn(8, 3, 16, 16, device="cuda") for _ in range(20)]
    batches[17][0, 0, 0, 0] = float("nan")
    precisebn.recompute_bn_buffers(model, batches[:2])  # warm-up: first-call set-up may sync

    def guarded():
        yield batches[0]
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches[1:]
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with pytest.raises(ValueError, match=r"'bn1', 'bn2', 'bn_head', first in batches 16-19"):
        precisebn.recompute_bn_buffers(model, guarded())


def test_cuda_half_precision_forward_is_the_models_own() -> None:
    """cuDNN's float16 kernel gives the same output through the tag as in the model."""
    import copy

    torch.manual_seed(2)
    model = SmallCNN().cuda().half().eval()
    x = (torch.randn(8, 3, 16, 16, device="cuda") * 3 + 1).half()
    out, _ = precisebn.capture(model, x)
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    with torch.no_grad():
        assert torch.equal(out, twin(x))


def test_cuda_buffers_the_forward_writes_stay_unchanged() -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 8)),
        torch.nn.BatchNorm1d(8),
    ).cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(16, 6, device="cuda") for _ in range(10)]
    new = precisebn.recompute_bn_buffers(model, batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_matches(new, pooled_inputs(model, batches))


def test_many_models_on_two_devices_and_vmap_on_cuda() -> None:
    """Each batch is placed once per device; vmap over stacked CUDA weights agrees."""
    torch.manual_seed(2)
    on_cpu, on_gpu = SmallCNN(), SmallCNN().cuda()
    batches = [torch.randn(8, 3, 16, 16) * 2 + 1 for _ in range(6)]
    cpu_new, gpu_new = precisebn.recompute_bn_buffers_many([on_cpu, on_gpu], batches)
    assert all(v.device.type == "cpu" for v in cpu_new.values())
    assert all(v.device.type == "cuda" for v in gpu_new.values())
    assert_matches(gpu_new, pooled_inputs(on_gpu, [b.cuda() for b in batches]))
    members = [SmallCNN().cuda() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    stacked = torch.func.vmap(
        lambda p, b: precisebn.recompute_bn_buffers(members[0], batches, params=p, buffers=b)
    )(params, buffers)
    for i, member in enumerate(members):
        alone = precisebn.recompute_bn_buffers(member, batches)
        for key, value in alone.items():
            torch.testing.assert_close(stacked[key][i], value, rtol=1e-5, atol=1e-6)
