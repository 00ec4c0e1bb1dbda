"""Many models, one pass: ``recompute_bn_buffers_many`` and ``vmap`` against K separate runs.

- **Rows.** K = 8 members of one architecture (the bench CNN, the bench MLP, each with
  its own seed), and K = 8 BN MLPs of different widths (subnets of different sizes),
  one list of models per row.
- **Methods**, timed side by side in one interleaved loop (`bench.timing.interleaved`
  over the K models held in one ``nn.ModuleList``, deep-copied for every call outside
  the timed region): ``many`` (`precisebn.recompute_bn_buffers_many`), ``vmap``
  (`precisebn.recompute_bn_buffers` under ``torch.func.vmap`` over
  ``torch.func.stack_module_state`` of the members, stacked once before timing; only
  where the members share an architecture), ``sequential precisebn`` (K calls of
  `precisebn.recompute_bn_buffers`) and ``sequential update_bn`` (K calls of
  ``torch.optim.swa_utils.update_bn``, each on its fresh copy).
- **Loaders.** *free*: a list of prebuilt tensors. *costly*: `DecodingLoader`, which
  on every pass decodes one PNG per sample with PIL, resizes it, crops and flips it at
  random (seeded, the same batches on every pass) and normalises it, as an image
  pipeline does; its own cost per batch is timed in the same loop (``loader only``).
- **Reference point.** A vmapped training-mode forward of the K members
  (``torch.func.functional_call`` under ``vmap`` over ``stack_module_state``, on copies
  whose BN layers keep no running statistics) against K sequential forwards of the same
  copies: why precisebn runs the members one after the other.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

import precisebn
from bench.models import CNN, MLP, Workload, bn_mlp, make_batches, make_model
from bench.timing import Timing, interleaved, synchronize

if TYPE_CHECKING:
    import numpy as np

K = 8
"""Members per row."""
COSTLY_TARGET = 0.3
"""``many`` / sequential precisebn with the costly loader, at most."""
FREE_TARGET = 1.0
"""``many`` / sequential precisebn with the free loader, at most."""
SUBNET_WIDTHS = tuple(range(128, 353, 32))
"""Widths of the subnets row's BN MLPs: 128 to 352, together about K widths of 256."""
BASELINE = "sequential precisebn"
LOADERS = ("free", "costly")
METHOD_NAMES = ("many", "vmap", "sequential precisebn", "sequential update_bn")
MEAN, STD = 0.45, 0.25
"""Normalisation of the decoded pixels (scaled to [0, 1]), every channel."""


@dataclass(frozen=True)
class Row:
    """K models, their batches, and the images the costly loader decodes for them."""

    label: str
    workload: Workload  # the input shape; the members' architecture where ``widths`` is None
    batch: int
    batches: tuple[int, int]  # (quick, full)
    source: int  # side of the PNG images the costly loader decodes
    widths: tuple[int, ...] | None = None  # BN MLP widths of different members

    @property
    def same_architecture(self) -> bool:
        return self.widths is None

    def models(self) -> list[nn.Module]:
        """The K members, each with its own seed, in training mode."""
        if self.widths is None:
            return [make_model(self.workload, seed=s) for s in range(K)]
        features = self.workload.sample_shape[0]
        return [
            make_model(
                Workload(f"mlp width {w}", lambda w=w: bn_mlp(features, w, 6), (features,)), s
            )
            for s, w in enumerate(self.widths)
        ]

    def describe(self) -> str:
        if self.widths is None:
            return f"{K} x the bench {self.workload.name} (seeds 0-{K - 1})"
        widths = ", ".join(map(str, self.widths))
        return f"{K} BN MLPs (6 hidden layers, as the bench mlp) of widths {widths}"


ROWS = (
    # The costly loaders decode images of the sizes data sets store (ImageNet-sized photos
    # for the CNN, MNIST-sized digits for the MLP) and resize them to the model's input.
    Row("same architecture, cnn", CNN, 32, (2, 8), source=256),
    Row("same architecture, mlp", MLP, 128, (10, 50), source=28),
    Row("8 different subnets, mlp", MLP, 128, (10, 50), source=28, widths=SUBNET_WIDTHS),
)


class DecodingLoader:
    """Batches decoded from PNG images on every pass, as an image pipeline makes them.

    At start-up, one smooth random PNG of ``source x source`` pixels per sample (RGB for
    a ``(3, H, W)`` sample, grayscale for a flat ``(F,)`` one, ``F`` a square: a
    ``sqrt(F) x sqrt(F)`` image, flattened). Every pass, per sample: decode with
    ``PIL.Image.open`` and resize with PIL to the sample's size plus a margin (no resize
    where the source has that size); then per batch: a random crop of the sample's size
    and a random horizontal flip of every sample (from a generator seeded anew each pass,
    so every pass yields the same batches), to float, scale to [0, 1], normalise.
    """

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        sizes: Sequence[int],
        *,
        source: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(sample_shape) == 3:
            channels, height, width = sample_shape
            self.flat = False
        elif len(sample_shape) == 1 and math.isqrt(sample_shape[0]) ** 2 == sample_shape[0]:
            channels, height, width = 1, math.isqrt(sample_shape[0]), math.isqrt(sample_shape[0])
            self.flat = True
        else:
            raise ValueError(f"no images for samples of shape {sample_shape}")
        self.sample_shape = sample_shape
        self.channels, self.height, self.width = channels, height, width
        self.margin = max(2, height // 8)
        self.sizes = list(sizes)
        self.source = source
        self.seed = seed
        self.device = torch.device(device)
        import numpy as np  # with PIL, from the bench extra (matplotlib needs both)

        rng = np.random.default_rng(seed)
        self.pngs = [_png(rng, source, channels) for _ in range(sum(self.sizes))]

    def __len__(self) -> int:
        return len(self.sizes)

    def describe(self) -> str:
        """What a pass does per sample, in words."""
        kind = "RGB" if self.channels == 3 else "grayscale"
        h, w, m = self.height, self.width, self.margin
        resize = "" if self.source == h + m else f", resized to {h + m} x {w + m}"
        flat = f", flattened to {h * w} features" if self.flat else ""
        return (
            f"{self.source} x {self.source} {kind} PNGs{resize}, "
            f"cropped to {h} x {w} and flipped at random{flat}"
        )

    def __iter__(self) -> Iterator[Tensor]:
        import numpy as np
        from PIL import Image

        gen = torch.Generator().manual_seed(self.seed)
        pngs = iter(self.pngs)
        h, w, m = self.height, self.width, self.margin
        rows, cols = torch.arange(h), torch.arange(w)
        for size in self.sizes:
            arrays = []
            for _ in range(size):
                img: Image.Image = Image.open(io.BytesIO(next(pngs)))
                if img.size != (w + m, h + m):
                    img = img.resize((w + m, h + m), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(img))
            pixels = torch.from_numpy(np.stack(arrays)).reshape(size, h + m, w + m, -1)
            # A random crop and horizontal flip per sample, as one gather for the batch.
            top, left = torch.randint(0, m + 1, (2, size), generator=gen)
            flip = torch.rand(size, generator=gen) < 0.5
            r = (top[:, None] + rows)[:, :, None]
            c = (left[:, None] + torch.where(flip[:, None], cols.flip(0), cols))[:, None, :]
            pixels = pixels[torch.arange(size)[:, None, None], r, c]
            x = pixels.permute(0, 3, 1, 2).float().div_(255).sub_(MEAN).div_(STD)
            x = x.reshape(size, -1) if self.flat else x.contiguous()
            yield x.to(self.device)


def _png(rng: np.random.Generator, side: int, channels: int) -> bytes:
    """A smooth random image with some grain (compresses like a photo), as PNG bytes."""
    import numpy as np
    from PIL import Image

    shape = (8, 8, channels) if channels > 1 else (8, 8)
    coarse = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _methods(
    models: Sequence[nn.Module], loader: Any, n: int, *, with_vmap: bool, last: dict[str, Any]
) -> dict[str, Callable[[nn.Module, Any], object]]:
    """The methods on one loader, as ``method(ensemble, _)`` for `interleaved`.

    ``ensemble`` is a fresh deep copy of the ``nn.ModuleList`` of the members. precisebn
    writes nothing to its models, so ``vmap`` uses weights stacked once from ``models``;
    ``update_bn`` writes to the copy. Each method's latest result goes into ``last``.
    """
    out: dict[str, Callable[[nn.Module, Any], object]] = {}

    def keep(name: str, result: Any) -> None:
        last[name] = result

    def many(ensemble: nn.Module, _: Any) -> None:
        keep("many", precisebn.recompute_bn_buffers_many(list(ensemble), loader, num_batches=n))

    out["many"] = many
    if with_vmap:
        params, buffers = stack_module_state(list(models))
        base = models[0]

        def vmapped(_ensemble: nn.Module, _: Any) -> None:
            def one(p: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
                return precisebn.recompute_bn_buffers(
                    base, loader, params=p, buffers=b, num_batches=n
                )

            keep("vmap", vmap(one)(params, buffers))

        out["vmap"] = vmapped

    def sequential(ensemble: nn.Module, _: Any) -> None:
        keep(
            BASELINE,
            [precisebn.recompute_bn_buffers(m, loader, num_batches=n) for m in ensemble],
        )

    def update_bn(ensemble: nn.Module, _: Any) -> None:
        for m in ensemble:
            torch.optim.swa_utils.update_bn(loader, m)

    out[BASELINE] = sequential
    out["sequential update_bn"] = update_bn
    return out


def _loader_only(loader: Any) -> Callable[[nn.Module, Any], object]:
    def run(_ensemble: nn.Module, _: Any) -> None:
        for _batch in loader:
            pass

    return run


def max_difference(results: dict[str, Any]) -> dict[str, float]:
    """Largest absolute difference of ``many``'s and ``vmap``'s buffers from those of
    the sequential runs, over every member, layer and channel."""
    reference = results[BASELINE]
    out = {}
    if "many" in results:
        out["many"] = max(
            (results["many"][i][key] - ref[key]).abs().max().item()
            for i, ref in enumerate(reference)
            for key in ref
        )
    if "vmap" in results:
        out["vmap"] = max(
            (results["vmap"][key][i] - ref[key]).abs().max().item()
            for i, ref in enumerate(reference)
            for key in ref
        )
    return out


def _paired(seconds: list[float], base: list[float]) -> dict[str, Any]:
    ratios = [s / b for s, b in zip(seconds, base, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def forward_ms(
    models: Sequence[nn.Module], batches: Sequence[Tensor], device: torch.device
) -> float:
    """Mean milliseconds of one member's training-mode forward of one batch (best of 2)."""
    best = math.inf
    with torch.no_grad():
        for _ in range(2):
            synchronize(device)
            start = time.perf_counter()
            for m in models:
                for x in batches:
                    m(x)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best / (len(models) * len(batches)) * 1e3


def _all_methods(
    row: Row,
    models: Sequence[nn.Module],
    n: int,
    device: torch.device,
    last: dict[str, dict[str, Any]],
) -> tuple[dict[str, Callable[[nn.Module, Any], object]], list[Tensor], DecodingLoader]:
    """Every method on both loaders of ``n`` batches (keyed ``"loader: method"``), and
    the two loaders."""
    free = make_batches(row.workload, [row.batch] * n, device=device.type)
    costly = DecodingLoader(
        row.workload.sample_shape, [row.batch] * n, source=row.source, device=device
    )
    methods: dict[str, Callable[[nn.Module, Any], object]] = {}
    for name, loader in (("free", free), ("costly", costly)):
        last.setdefault(name, {})
        group = _methods(models, loader, n, with_vmap=row.same_architecture, last=last[name])
        methods.update({f"{name}: {method}": run for method, run in group.items()})
    methods["costly: loader only"] = _loader_only(costly)
    return methods, free, costly


def time_row(
    row: Row,
    n: int,
    *,
    repeats: int,
    warmup: bool = True,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Every method on both loaders, interleaved in one loop; seconds and paired ratios.

    ``warmup``: first call every method once on loaders of one batch (not timed), which
    sets up what a first call sets up at a fraction of a full warm-up round's cost.
    """
    device = device or torch.device("cpu")
    models = [m.to(device) for m in row.models()]
    last: dict[str, dict[str, Any]] = {}
    if warmup:
        small, _, _ = _all_methods(row, models, 1, device, {})
        for call in small.values():
            call(copy.deepcopy(nn.ModuleList(models)), None)
    methods, free, costly = _all_methods(row, models, n, device, last)
    timings: dict[str, Timing] = interleaved(
        methods,  # type: ignore[arg-type]
        nn.ModuleList(models),
        free,
        repeats=repeats,
        warmup=0,
        device=device,
        baseline=f"free: {BASELINE}",
    )
    seconds = {name: t.seconds for name, t in timings.items()}
    out: dict[str, Any] = {
        "label": row.label,
        "models": row.describe(),
        "batch": row.batch,
        "num_batches": n,
        "costly_loader": costly.describe(),
        "forward_ms": forward_ms(models, free, device),
        "loaders": {},
    }
    for name in LOADERS:
        base = seconds[f"{name}: {BASELINE}"]
        per: dict[str, Any] = {"methods": {}}
        for method in METHOD_NAMES:
            secs = seconds.get(f"{name}: {method}")
            if secs is None:
                continue
            per["methods"][method] = {
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "seconds": secs,
                **_paired(secs, base),
            }
        per["many_vs_update_bn"] = _paired(
            seconds[f"{name}: many"], seconds[f"{name}: sequential update_bn"]
        )
        per["max_difference"] = max_difference(last[name])
        out["loaders"][name] = per
    loader_s = seconds["costly: loader only"]
    out["loaders"]["costly"]["loader_ms_per_batch"] = statistics.median(loader_s) / n * 1e3
    out["loaders"]["free"]["loader_ms_per_batch"] = 0.0
    # The cost model: many = K forwards + one pass of the loader, sequential = K of both.
    free_many = out["loaders"]["free"]["methods"]["many"]["median_s"]
    free_seq = out["loaders"]["free"]["methods"][BASELINE]["median_s"]
    loader_total = statistics.median(loader_s)
    out["loaders"]["costly"]["expected_ratio"] = (free_many + loader_total) / (
        free_seq + K * loader_total
    )
    out["loaders"]["free"]["expected_ratio"] = None  # the measured ratio itself
    return out


def forward_reference(
    workload: Workload,
    batch: int,
    n: int,
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """A vmapped training-mode forward of K members against K sequential forwards."""
    device = device or torch.device("cpu")
    members = [replace_all_batch_norm_modules_(make_model(workload, seed=s)) for s in range(K)]
    members = [m.to(device) for m in members]
    params, buffers = stack_module_state(members)
    base = members[0]
    batches = make_batches(workload, [batch] * n, device=device.type)

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))  # type: ignore[no-any-return]

    batched = vmap(one, in_dims=(0, 0, None))

    def vmapped(_ensemble: nn.Module, xs: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for x in xs:
                batched(params, buffers, x)

    def sequential(ensemble: nn.Module, xs: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for x in xs:
                for m in ensemble:
                    m(x)

    timings = interleaved(
        {"sequential": sequential, "vmap": vmapped},  # type: ignore[dict-item]
        nn.ModuleList(members),
        batches,
        repeats=repeats,
        warmup=warmup,
        device=device,
        baseline="sequential",
    )
    seq, vm = timings["sequential"], timings["vmap"]
    return {
        "workload": f"{workload.name} batch {batch}",
        "num_batches": n,
        "sequential_ms_per_batch": seq.median / n * 1e3,
        "vmap_ms_per_batch": vm.median / n * 1e3,
        "ratio": vm.ratio,
        "ratio_min": min(vm.ratios),
        "ratio_max": max(vm.ratios),
    }


def run(*, quick: bool, repeats: int, device: torch.device | None = None) -> dict[str, Any]:
    """Every row of this module, as JSON-serialisable results."""
    start = time.perf_counter()
    out: dict[str, Any] = {
        "k": K,
        "costly_target": COSTLY_TARGET,
        "free_target": FREE_TARGET,
        "rows": [],
    }
    for row in ROWS:
        n = row.batches[0] if quick else row.batches[1]
        out["rows"].append(time_row(row, n, repeats=repeats, device=device))
        print(f"  many: {row.label} done", flush=True)
    reference = [(CNN, 32, 2 if quick else 8), (MLP, 128, 10 if quick else 50)]
    out["forward"] = [
        forward_reference(w, b, n, repeats=repeats, device=device) for w, b, n in reference
    ]
    print("  many: vmapped forward done", flush=True)
    out["wall_s"] = time.perf_counter() - start
    return out
