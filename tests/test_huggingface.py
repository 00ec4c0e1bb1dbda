"""precisebn.huggingface.PreciseBNCallback with a real transformers.Trainer on the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader

import precisebn
from spawned import free_port, rank_environment

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from precisebn.huggingface import PreciseBNCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A ResNet for image classification built from a config: no weights are downloaded."""
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    return transformers.ResNetForImageClassification(config)


def items(count: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(count, 3, 16, 16, generator=gen) * 2 + 1
    labels = torch.randint(0, 3, (count,), generator=gen)
    return [{"pixel_values": p, "labels": int(y)} for p, y in zip(pixels, labels, strict=True)]


def train(tmp_path: Path, model: nn.Module, callback: Any, **kwargs: Any) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=kwargs.pop("epochs", 1),
        per_device_train_batch_size=8,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=items(), callbacks=[callback]
    )
    trainer.train()
    return trainer


def exact(model: nn.Module, loader: Any) -> precisebn.BNBuffers:
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return precisebn.recompute_bn_buffers(
            model, loader, forward=lambda m, b: m(pixel_values=b["pixel_values"])
        )
    finally:
        for module, flag in zip(model.modules(), flags, strict=True):
            module.training = flag


def test_recomputes_at_the_end_of_training(tmp_path: Path) -> None:
    model = tiny_resnet()
    callback = PreciseBNCallback()
    trainer = train(tmp_path, model, callback)
    assert callback.last is not None
    assert callback.last.num_batches == 6  # 48 items in batches of 8
    logged = [e for e in trainer.state.log_history if "precisebn/num_batches" in e]
    assert len(logged) == 1
    assert logged[0]["precisebn/num_batches"] == 6
    # The stem's BN input does not depend on how the shuffled batches were composed, so
    # its statistics over one epoch in any order are those of every item.
    fixed = DataLoader(items(), batch_size=8, collate_fn=transformers.default_data_collator)
    want = exact(model, fixed)
    stem = "resnet.embedder.embedder.normalization"
    for stat in ("running_mean", "running_var"):
        key = f"{stem}.{stat}"
        torch.testing.assert_close(model.get_buffer(key), want[key], rtol=1e-5, atol=1e-6)


def test_every_epoch_on_a_given_loader_is_exact(tmp_path: Path) -> None:
    model = tiny_resnet()
    fixed = DataLoader(items(), batch_size=8, collate_fn=transformers.default_data_collator)
    callback = PreciseBNCallback(every_epoch=True, dataloader=fixed)
    trainer = train(tmp_path, model, callback, epochs=2)
    logged = [e for e in trainer.state.log_history if "precisebn/num_batches" in e]
    assert len(logged) == 2  # once per epoch; not again at the end
    for key, value in exact(model, fixed).items():
        torch.testing.assert_close(model.get_buffer(key), value, rtol=1e-6, atol=1e-7)
    assert model.training  # the trainer's flags are kept


def test_labels_and_unknown_keys_are_left_out() -> None:
    model = tiny_resnet()
    batches = [
        {
            "pixel_values": torch.randn(4, 3, 16, 16),
            "labels": torch.zeros(4, dtype=torch.long),
            "image_id": torch.arange(4),
        }
        for _ in range(3)
    ]
    new, _ = PreciseBNCallback().recompute(model, batches)
    want = exact(model, batches)
    for key, value in want.items():
        assert torch.equal(new[key], value)


def test_dropout_is_off_during_the_recompute() -> None:
    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, features: Tensor) -> Tensor:
            return self.bn(self.drop(features))

    model = Dropped().train()
    batches = [{"features": torch.randn(16, 4) + 2} for _ in range(4)]
    new, _ = PreciseBNCallback().recompute(model, batches)
    values = torch.cat([b["features"] for b in batches]).double()
    torch.testing.assert_close(new["bn.running_var"].double(), values.var(dim=0), rtol=1e-5, atol=0)
    assert model.drop.training


# ---------------------------------------------------------------- two processes on gloo


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    warnings.simplefilter("ignore")  # the trainer's advice for real runs
    callback = PreciseBNCallback()
    model = tiny_resnet()
    train(Path(out), model, callback, ddp_backend="gloo")
    assert callback.last is not None
    result = {
        "distributed": torch.distributed.is_initialized(),
        "num_batches": callback.last.num_batches,
        "buffers": {k: v.clone() for k, v in precisebn.bn_buffers(model).items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_ddp_processes_end_identical_and_pooled(tmp_path: Path) -> None:
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["distributed"] for r in ranks)
    assert [r["num_batches"] for r in ranks] == [6, 6]  # 3 batches per rank, pooled
    for key, value in ranks[0]["buffers"].items():
        assert torch.equal(value, ranks[1]["buffers"][key]), key
    # The stem's statistics are those of every item, whichever rank read it (its input is
    # conv(pixels), whatever the batches' composition).
    model = tiny_resnet()
    model.load_state_dict(ranks[0]["state"])
    fixed = DataLoader(items(), batch_size=8, collate_fn=transformers.default_data_collator)
    want = exact(model, fixed)
    for stat in ("running_mean", "running_var"):
        key = f"resnet.embedder.embedder.normalization.{stat}"
        torch.testing.assert_close(ranks[0]["buffers"][key], want[key], rtol=1e-5, atol=1e-6)
