"""precisebn.mmengine.PreciseBNHook with a real mmengine Runner on the CPU."""

from __future__ import annotations

import copy
import itertools
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import precisebn

from reference import assert_matches, pooled_inputs

pytest.importorskip("mmengine")

# First: it imports mmengine without the warnings torch gives of torch.jit on the way.
from precisebn.mmengine import PreciseBNHook
from spawned import free_port, rank_environment

# isort: split
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, ImgDataPreprocessor
from mmengine.registry import HOOKS, DefaultScope, Registry
from mmengine.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parent.parent / "docs"
BATCH = 8
NORMALISE = {"mean": [1.0, 0.5, 0.0], "std": [2.0, 1.0, 3.0]}


class Net(BaseModel):
    """Dropout, conv, BN, conv, BN and a head, behind a data preprocessor that normalises
    the images: the BN layers see what the preprocessor made. ``frozen`` keeps the second
    BN layer in eval mode, as mmpretrain's ``norm_eval=True`` does."""

    def __init__(
        self, *, dropout: float = 0.0, frozen: bool = False, preprocessor: Any = None
    ) -> None:
        if preprocessor is None:
            preprocessor = {"type": "ImgDataPreprocessor", **NORMALISE}
        super().__init__(data_preprocessor=preprocessor)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.frozen = frozen

    def forward(self, inputs: Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        h = torch.relu(self.bn(self.conv(self.drop(inputs))))
        h = torch.relu(self.bn2(self.conv2(h)))
        logits = self.head(h.mean(dim=(2, 3)))
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(logits, torch.stack(data_samples))}
        if mode == "predict":
            return list(zip(logits, data_samples, strict=True))
        return logits

    def train(self, mode: bool = True) -> Net:
        super().train(mode)
        if self.frozen:
            self.bn2.eval()
        return self


class Items(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Images as mmengine's datasets give them: ``{"inputs": CHW, "data_samples": label}``."""

    def __init__(self, count: int = 48, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 8, 8, generator=gen) * 2 + 1
        self.labels = torch.randint(0, 3, (count,), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"inputs": self.images[index], "data_samples": self.labels[index]}


class Accuracy(BaseMetric):
    default_prefix = "toy"

    def process(self, data_batch: Any, data_samples: Any) -> None:
        self.results.extend(int(logits.argmax() == label) for logits, label in data_samples)

    def compute_metrics(self, results: list[int]) -> dict[str, float]:
        return {"accuracy": sum(results) / len(results)}


class Watch(Hook):
    """Keeps a copy of the model after every training epoch's hooks, and the BN buffers
    that validation saw."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.models: list[nn.Module] = []
        self.validated: list[dict[str, Tensor]] = []

    def after_train_epoch(self, runner: Any) -> None:
        self.models.append(copy.deepcopy(runner.model))

    def before_val_epoch(self, runner: Any) -> None:
        self.validated.append(stats(runner.model))


def stats(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in precisebn.bn_buffers(model).items()}


_runs = itertools.count()


def runner(
    tmp_path: Path,
    model: nn.Module | None = None,
    *,
    sampler: str = "DefaultSampler",
    **options: Any,
) -> Any:
    config: dict[str, Any] = {
        "model": Net() if model is None else model,
        "work_dir": str(tmp_path),
        "experiment_name": f"run{next(_runs)}",  # one logger and visualizer per runner
        "train_dataloader": {
            "dataset": Items(),
            "sampler": {"type": sampler, "shuffle": False},
            "collate_fn": {"type": "pseudo_collate"},
            "batch_size": BATCH,
            "num_workers": 0,
        },
        "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.1}},
        "train_cfg": {"by_epoch": True, "max_epochs": 1},
        "default_hooks": {"checkpoint": None, "logger": {"type": "LoggerHook", "interval": 1}},
        "randomness": {"seed": 0},
    }
    config.update(options)
    return Runner(**config)


def batches(count: int, dataset: Any = None) -> list[dict[str, Any]]:
    """The first ``count`` batches of the runners' train dataloader, collated alike."""
    items = Items() if dataset is None else dataset
    return [
        pseudo_collate([items[i] for i in range(b * BATCH, (b + 1) * BATCH)]) for b in range(count)
    ]


def logged_scalars(fit: Any) -> list[dict[str, Any]]:
    """What the hook sent to the visualizer's local backend."""
    lines = (Path(fit.log_dir) / "vis_data" / "scalars.json").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "precisebn/num_batches" in r]


def run(model: Any, batch: Any) -> Any:
    """How the hook feeds a batch: the data preprocessor, then the tensor-mode forward."""
    return model(**model.data_preprocessor(batch, False), mode="tensor")


def reference(model: nn.Module, data: list[Any], **kwargs: Any) -> dict[str, Tensor]:
    """Every value the BN layers of ``model`` receive, with dropout off."""
    return pooled_inputs(copy.deepcopy(model).eval(), data, run=run, **kwargs)


# ----------------------------------------------------------------------------- timing


def test_after_each_epoch_before_validation_and_checkpoint(tmp_path: Path) -> None:
    watch = Watch()
    fit = runner(
        tmp_path,
        train_cfg={"by_epoch": True, "max_epochs": 2, "val_interval": 1},
        val_dataloader={
            "dataset": Items(16, seed=1),
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "batch_size": BATCH,
        },
        val_cfg={},
        val_evaluator={"type": Accuracy},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}},
        custom_hooks=[{"type": "PreciseBNHook", "num_samples": 20}, watch],
    )
    fit.train()
    assert len(watch.models) == 2
    for epoch, model in enumerate(watch.models, start=1):
        # Exact for the weights at the epoch's end: run after its last iteration, on
        # ceil(20 / 8) = 3 batches of the train dataloader, through the preprocessor.
        new = stats(model)
        assert_matches(new, reference(model, batches(3)))
        # Validation saw them, and the epoch's checkpoint holds them.
        for key, value in new.items():
            assert torch.equal(watch.validated[epoch - 1][key], value), key
        saved = torch.load(tmp_path / f"epoch_{epoch}.pth", weights_only=False)["state_dict"]
        for key, value in new.items():
            assert torch.equal(saved[key], value), key
    hook = next(h for h in fit.hooks if isinstance(h, PreciseBNHook))
    assert hook.last is not None
    assert (hook.last.num_batches, hook.last.num_samples) == (3, 24)
    # Logged through the message hub, the visualizer's backends and the logger.
    hub = fit.message_hub
    assert hub.get_scalar("precisebn/num_batches").data[0].tolist() == [3.0, 3.0]
    assert hub.get_scalar("precisebn/max_shift").data[0][0] > 0.0
    logged = logged_scalars(fit)
    assert [(r["step"], r["precisebn/num_batches"]) for r in logged] == [(6, 3.0), (12, 3.0)]
    text = (Path(fit.log_dir) / f"{fit.timestamp}.log").read_text()
    assert re.search(r"PreciseBNHook: recomputed .* over 3 batches \(24 samples\)", text)


def test_runs_before_the_ema_and_checkpoint_hooks(tmp_path: Path) -> None:
    watch = Watch()
    fit = runner(
        tmp_path,
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}},
        custom_hooks=[
            {"type": "EMAHook", "momentum": 0.5},
            {"type": "PreciseBNHook", "num_samples": 16},
            watch,
        ],
    )
    order = [type(h).__name__ for h in fit.hooks]
    assert order.index("PreciseBNHook") < order.index("EMAHook") < order.index("CheckpointHook")
    fit.train()
    model = watch.models[0]
    new = stats(model)
    assert_matches(new, reference(model, batches(2)))
    # The EMA hook's copy of the buffers has them too: the checkpoint's state dict (the
    # averaged weights, for deployment) holds the new statistics, not those of the last
    # training iteration.
    saved = torch.load(tmp_path / "epoch_1.pth", weights_only=False)
    for key, value in new.items():
        assert torch.equal(saved["state_dict"][key], value), key
        assert torch.equal(saved["ema_state_dict"][f"module.{key}"], value), key


class Recorded(PreciseBNHook):
    """Says after how many training iterations each recompute ran."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.after: list[int] = []

    def recompute(self, runner: Any, *, step: int | None = None) -> Any:
        self.after.append(runner.iter if step is None else step)
        return super().recompute(runner, step=step)


@pytest.mark.parametrize(
    ("train_cfg", "sampler", "interval", "after"),
    [
        # After epoch 2 (of 6 iterations each); after iterations 3 and 6, as configs of
        # iteration-based loops sample.
        ({"by_epoch": True, "max_epochs": 2}, "DefaultSampler", 2, [12]),
        ({"by_epoch": False, "max_iters": 6}, "InfiniteSampler", 3, [3, 6]),
    ],
)
def test_every_interval_epochs_or_iterations(
    tmp_path: Path, train_cfg: dict[str, Any], sampler: str, interval: int, after: list[int]
) -> None:
    hook = Recorded(num_samples=16, interval=interval)
    fit = runner(tmp_path, sampler=sampler, train_cfg=train_cfg, custom_hooks=[hook])
    fit.train()
    assert hook.after == after
    assert [r["step"] for r in logged_scalars(fit)] == after  # as the logger hook counts
    # The last ran after the last weight update: exact for the final weights.
    assert_matches(stats(fit.model), reference(fit.model, batches(2)))


class Seen(Hook):
    """Which batches the training loop ran, by the sum of their first image."""

    def __init__(self) -> None:
        self.batches: list[float] = []

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, **_: Any
    ) -> None:
        self.batches.append(round(float(data_batch["inputs"][0].sum()), 3))


def test_an_iteration_loop_runs_the_batches_it_would_run_without(tmp_path: Path) -> None:
    """The hook reads batches of its own: an InfiniteSampler draws from one generator (and
    persistent workers serve one iterator) that the loop is in the middle of."""
    ran = []
    for hooks in ([], [PreciseBNHook(num_samples=16, interval=4)]):
        seen = Seen()
        options = {
            "train_cfg": {"by_epoch": False, "max_iters": 10},
            "custom_hooks": [*hooks, seen],
        }
        runner(tmp_path, sampler="InfiniteSampler", **options).train()
        ran.append(seen.batches)
    assert len(ran[0]) == 10
    assert ran[1] == ran[0]


# ------------------------------------------------------------------ what it recomputes


def test_frozen_layers_kept_and_dropout_off(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(dropout=0.5, frozen=True)
    fit = runner(tmp_path, model=model, custom_hooks=[{"type": "PreciseBNHook", "num_samples": 24}])
    fit.train()
    # The frozen layer keeps its initial buffers; the other holds the exact statistics of
    # its inputs with dropout off (the frozen layer normalising with its running ones).
    assert torch.equal(model.bn2.running_mean.cpu(), torch.zeros(4))
    assert torch.equal(model.bn2.running_var.cpu(), torch.ones(4))
    assert_matches(stats(model), reference(model, batches(3), layers=["bn"]))
    # The modes are the runner's again.
    assert model.training
    assert model.drop.training
    assert not model.bn2.training


def test_eval_mode_off_keeps_dropout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(dropout=0.5)
    hook = PreciseBNHook(num_samples=24, eval_mode=False)
    runner(tmp_path, model=model, custom_hooks=[hook]).train()
    without = reference(model, batches(3))["bn"].var(dim=1)
    assert not torch.allclose(model.bn.running_var.cpu().double(), without, rtol=1e-3)


class Shifting(ImgDataPreprocessor):
    """Moves the images in training, as a batch augment (mixup) changes them."""

    def forward(self, data: Any, training: bool = False) -> Any:
        out = super().forward(data, training)
        if training:
            out["inputs"] = out["inputs"] + 10.0
        return out


def test_the_preprocessor_runs_as_for_evaluation_unless_asked(tmp_path: Path) -> None:
    model = Net(preprocessor=Shifting(**NORMALISE))
    fit = runner(tmp_path, model=model)
    PreciseBNHook(num_samples=16).recompute(fit)
    assert_matches(stats(model), reference(model, batches(2)))

    def augmented(model: Any, batch: Any) -> Any:
        return model(**model.data_preprocessor(batch, True), mode="tensor")

    PreciseBNHook(num_samples=16, preprocess_training=True).recompute(fit)
    want = pooled_inputs(copy.deepcopy(model).eval(), batches(2), run=augmented)
    assert_matches(stats(model), want)


def test_no_training_bn_layer_is_skipped_with_a_warning(tmp_path: Path) -> None:
    model = Net()
    fit = runner(tmp_path, model=model)
    model.eval()
    before = stats(model)
    hook = PreciseBNHook(num_samples=8)
    assert hook.recompute(fit) is None
    for key, value in stats(model).items():
        assert torch.equal(value, before[key])
    assert (
        "no BatchNorm layer in training mode"
        in (Path(fit.log_dir) / f"{fit.timestamp}.log").read_text()
    )


def test_a_dataloader_config_and_the_batch_count(tmp_path: Path) -> None:
    data = Items(40, seed=3)
    hook = PreciseBNHook(
        num_samples=1000,  # more than the dataloader holds: it is read whole
        dataloader={
            "dataset": data,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "batch_size": BATCH,
        },
    )
    fit = runner(tmp_path, custom_hooks=[hook])
    fit.train()
    assert hook.last is not None
    assert (hook.last.num_batches, hook.last.num_samples) == (5, 40)
    assert_matches(stats(fit.model), reference(fit.model, batches(5, data)))
    assert hook.num_batches(fit.train_dataloader) == 125  # ceil(1000 / 8)


# ------------------------------------------------------------------- config and import


class Theirs(Hook):
    """Stands for mmpretrain's hook of the same name, registered in a scope of its own."""


THEIRS = Registry("hook", parent=HOOKS, scope="theirs")
THEIRS.register_module(name="PreciseBNHook", module=Theirs)


@pytest.mark.parametrize("block", [0, 1])
def test_the_configs_of_the_docs_build_the_hook(tmp_path: Path, block: int) -> None:
    fence = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
    blocks = [b for b in fence.findall((DOCS / "mmengine.md").read_text()) if "custom_hooks" in b]
    path = tmp_path / "config.py"
    path.write_text(re.sub(r"^_base_ = .*$", "", blocks[block], flags=re.MULTILINE))
    config = Config.fromfile(str(path))  # runs the custom_imports
    scope = ["mmengine", "theirs"][block]  # the second is mmpretrain's, in its own scope
    try:
        fit = runner(tmp_path, default_scope=scope, custom_hooks=config.custom_hooks)
        plain = HOOKS.build({"type": "PreciseBNHook"})  # in the runner's default scope
    finally:
        DefaultScope.get_instance(f"after-{tmp_path.name}", scope_name="mmengine")
    [hook] = [h for h in fit.hooks if isinstance(h, PreciseBNHook)]
    assert (hook.num_samples, hook.interval, hook.priority) == (8192, 1, "ABOVE_NORMAL")
    # Where another library has a hook of this name, the plain name finds that one.
    assert type(plain) is [PreciseBNHook, Theirs][block]


def test_registered_under_its_name() -> None:
    built = HOOKS.build({"type": "PreciseBNHook", "num_samples": 64, "interval": 2})
    assert type(built) is PreciseBNHook
    assert (built.num_samples, built.interval) == (64, 2)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        PreciseBNHook(num_samples=0)
    with pytest.raises(ValueError, match="interval must be a positive int"):
        PreciseBNHook(interval=True)


def test_precisebn_alone_does_not_import_mmengine_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    code = "import sys, precisebn; assert 'mmengine' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    monkeypatch.delitem(sys.modules, "precisebn.mmengine")
    monkeypatch.setitem(sys.modules, "mmengine.hooks", None)  # as if it were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'precisebn[mmengine]'")):
        import precisebn.mmengine  # noqa: F401


# ------------------------------------------------------------- two processes on gloo


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    warnings.simplefilter("ignore")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    hook = PreciseBNHook(num_samples=32)
    fit = runner(
        Path(out) / f"rank{rank}",
        launcher="pytorch",
        cfg={"model_wrapper_cfg": {"type": "MMDistributedDataParallel", "device_ids": None}},
        custom_hooks=[hook],
    )
    fit.train()
    assert hook.last is not None
    model = fit.model.module
    result = {
        "wrapped": type(fit.model).__name__,
        "info": (hook.last.num_batches, hook.last.num_samples),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_ranks_pool_their_shards(tmp_path: Path) -> None:
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["wrapped"] for r in ranks] == ["MMDistributedDataParallel"] * 2
    # ceil(32 / (8 * 2)) = 2 batches per rank, 32 samples in all.
    assert [r["info"] for r in ranks] == [(4, 32), (4, 32)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # The statistics of the four batches the two ranks read (DefaultSampler gives rank r
    # the items r, r + 2, ...), as if one process had run them all.
    model = Net()
    model.load_state_dict(ranks[0]["state"])
    items = Items()
    shards = [
        pseudo_collate([items[i] for i in range(r + 2 * BATCH * b, r + 2 * BATCH * (b + 1), 2)])
        for r in range(2)
        for b in range(2)
    ]
    assert_matches(stats(model), reference(model, shards))
