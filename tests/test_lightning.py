"""precisebn.lightning.PreciseBN with a real lightning.Trainer on the CPU."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import precisebn

L = pytest.importorskip("lightning.pytorch")

from precisebn.lightning import PreciseBN  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning's advice for real training (more workers, a GPU) does not apply here.
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*sync_dist=True:UserWarning"),
    # Lightning's own use of a torch pytree API that torch has deprecated.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


class Net(L.LightningModule):
    """Conv, BN, dropout and a linear head: BN's input does not depend on how the batches
    are composed, so the statistics of a sharded run can be checked against one process."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(self.drop(x))))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch: Any, index: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictNet(Net):
    """Batches are dicts; the module says how to feed one."""

    def training_step(self, batch: Any, index: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def precisebn_forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["image"])


def data(count: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 8, 8, generator=gen) * 2 + 1
    return TensorDataset(x, torch.randint(0, 3, (count,), generator=gen))


def loader(dataset: Any = None, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(data() if dataset is None else dataset, batch_size=16, **kwargs)


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": L.loggers.CSVLogger(tmp_path),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def expected(model: nn.Module, batches: Any) -> precisebn.BNBuffers:
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        return precisebn.recompute_bn_buffers(model, batches)
    finally:
        for module, flag in zip(model.modules(), flags, strict=True):
            module.training = flag


def assert_buffers(model: nn.Module, want: dict[str, Tensor]) -> None:
    for key, value in want.items():
        torch.testing.assert_close(model.get_buffer(key), value, rtol=1e-6, atol=1e-7)


def test_recomputed_before_validation_and_logged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(dropout=0.3)
    callback = PreciseBN()
    seen: list[Tensor] = []

    class Watch(L.Callback):
        def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
            seen.append(module.bn.running_var.clone())

    fit = trainer(tmp_path, [callback, Watch()])
    fit.fit(model, loader(), loader(data(32, seed=1)))
    # The buffers are the exact statistics of the final weights, with dropout off...
    want = expected(model, loader())
    assert_buffers(model, dict(want))
    # ...which validation saw (precise BN runs before the other callbacks' hooks).
    torch.testing.assert_close(seen[-1], want["bn.running_var"])
    assert callback.last is not None
    assert callback.last.num_batches == 4
    with (tmp_path / "lightning_logs/version_0/metrics.csv").open() as metrics:
        rows = list(csv.DictReader(metrics))
    logged = [r for r in rows if r.get("precisebn/num_batches")]
    assert len(logged) == 2  # once per epoch
    assert float(logged[-1]["precisebn/num_batches"]) == 4.0
    assert float(logged[0]["precisebn/max_shift"]) > 0.0


def test_dropout_off_unless_asked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(dropout=0.5)
    callback = PreciseBN(on="fit_end", eval_mode=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    with_dropout = model.bn.running_var.clone()
    assert not torch.allclose(with_dropout, expected(model, loader())["bn.running_var"])
    model.train()
    PreciseBN(dataloader=loader()).recompute(L.Trainer(logger=False), model)
    assert model.training  # the flags are restored
    assert model.drop.training
    assert_buffers(model, dict(expected(model, loader())))


def test_dict_batches_through_the_module_hook(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DictNet()
    items = [{"image": x, "label": y} for x, y in data()]
    batches = DataLoader(items, batch_size=16)
    trainer(tmp_path, [PreciseBN(on="fit_end")], max_epochs=1).fit(model, batches)
    want = precisebn.recompute_bn_buffers(
        model, batches, forward=lambda m, b: m.precisebn_forward(b)
    )
    assert_buffers(model, dict(want))


def test_runs_after_stochastic_weight_averaging(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    swa = L.callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    callback = PreciseBN(on="fit_end")
    trainer(tmp_path, [swa, callback], max_epochs=3).fit(model, loader())
    # The averaged weights are in the model, and their statistics are exact.
    assert_buffers(model, dict(expected(model, loader())))
    assert callback.last is not None


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="on must be one of"):
        PreciseBN(on="epoch")
    with pytest.raises(ValueError, match="every_n_epochs"):
        PreciseBN(every_n_epochs=0)


# ------------------------------------------------------------------------ DDP, 2 ranks


class SaveBuffers(L.Callback):
    """Each rank writes its BN buffers after PreciseBN ran."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        buffers = {k: v.clone() for k, v in precisebn.bn_buffers(module).items()}
        torch.save(buffers, Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_end_identical_and_pooled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(
            tmp_path,
            [PreciseBN(on="fit_end"), SaveBuffers(str(tmp_path))],
            max_epochs=1,
            devices=2,
            strategy="ddp_spawn",
        )
        fit.fit(model, loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Pooled over both ranks' shards: the statistics of the whole data set.
    want = expected(model, loader())
    for key, value in want.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
