"""The models and synthetic batches the benchmarks run on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN pairs and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_cnn(width: int = 16, blocks: int = 1, classes: int = 10) -> nn.Module:
    """A CIFAR-style ResNet (3 stages, ``blocks`` basic blocks each) for 32x32 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride on the 3x3 conv), expansion 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet basic block, with its module names (``downsample``)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet, written out by hand with its layout and module names
    (``conv1``, ``bn1``, ``layer1.0.downsample.1``, ``fc``, ...), so that its state dict
    has torchvision's keys and its BN layers sit where torchvision's do.

    torchvision itself is not installable next to the torch of the bench's environment
    (no wheel of it pairs with this torch build), so the bench does not import it.
    ``resnet(18)`` and ``resnet(50)`` have torchvision's ``resnet18`` and ``resnet50``
    layers, channel counts and weight initialisation; the bench runs them on small images.
    """

    def __init__(self, block: type[Bottleneck | TorchvisionBasicBlock], counts: list[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for i, count in enumerate(counts):
            planes = 64 * 2**i
            blocks = []
            for b in range(count):
                blocks.append(block(cin, planes, 2 if i > 0 and b == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int) -> ResNet:
    """torchvision's ``resnet18`` or ``resnet50`` layout (see `ResNet`)."""
    if depth == 18:
        return ResNet(TorchvisionBasicBlock, [2, 2, 2, 2])
    if depth == 50:
        return ResNet(Bottleneck, [3, 4, 6, 3])
    raise ValueError(f"no ResNet-{depth} here: 18 or 50")


class Detector(nn.Module):
    """A detection-style net: a BN backbone (a `ResNet` trunk, ResNet-18's by default,
    without its pooling and classifier), then an FPN and an FCOS-style head that hold no
    BatchNorm.

    The backbone gives C3-C5 (strides 8, 16, 32); the FPN makes P3-P5 of ``channels``
    channels (1x1 laterals, nearest top-down upsampling, a 3x3 conv per level); the head,
    shared over the levels, has a classification and a box tower of ``convs`` 3x3 convs,
    each followed by ``GroupNorm(32)`` and a ReLU (as FCOS's, RetinaNet's with GN), then
    predicts ``classes`` scores, 4 box distances and a centerness per position. Every
    BatchNorm layer is in ``backbone``; what follows its last BN call is the heavy part.
    """

    def __init__(
        self,
        trunk: ResNet | None = None,
        channels: int = 256,
        convs: int = 4,
        classes: int = 80,
    ) -> None:
        super().__init__()
        trunk = trunk or resnet(18)
        del trunk.avgpool, trunk.fc
        self.backbone = trunk
        expansion = type(trunk.layer1[0]).expansion
        widths = [c * expansion for c in (128, 256, 512)]
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, 1, 1) for _ in widths)

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [
                    nn.Conv2d(channels, channels, 3, 1, 1),
                    nn.GroupNorm(32, channels),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, classes, 3, 1, 1)
        self.box_pred = nn.Conv2d(channels, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(channels, 1, 3, 1, 1)

    def features(self, x: Tensor) -> list[Tensor]:
        """C3, C4 and C5: the backbone's last three stages."""
        b = self.backbone
        x = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        c3 = b.layer2(x)
        c4 = b.layer3(c3)
        return [c3, c4, b.layer4(c4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.features(x)
        inner = self.lateral[-1](feats[-1])
        pyramid = [self.output[-1](inner)]
        for i in (1, 0):
            up = nn.functional.interpolate(inner, size=feats[i].shape[-2:], mode="nearest")
            inner = self.lateral[i](feats[i]) + up
            pyramid.insert(0, self.output[i](inner))
        out = []
        for p in pyramid:
            cls, box = self.cls_tower(p), self.box_tower(p)
            out += [self.cls_logits(cls), self.box_pred(box).relu(), self.centerness(box)]
        return out


def detector_backbone(name: str, module: nn.Module) -> bool:
    """``layers=`` for a `Detector`: the BN layers of its backbone."""
    return name.startswith("backbone.")


def bn_stack(depth: int, width: int = 8) -> nn.Module:
    """``depth`` BatchNorm1d layers of ``width`` channels and nothing else: on tiny inputs
    the kernels cost almost nothing, so a run's time is its cost per call."""
    return nn.Sequential(*(nn.BatchNorm1d(width) for _ in range(depth)))


def bn_mlp(features: int = 64, width: int = 256, depth: int = 6) -> nn.Module:
    """An MLP with a BatchNorm1d after every linear layer: BN is a large share of the work."""
    layers: list[nn.Module] = []
    cin = features
    for _ in range(depth):
        layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
        cin = width
    layers.append(nn.Linear(cin, 1))
    return nn.Sequential(*layers)


def conv3d_net(width: int = 8) -> nn.Module:
    """A small video-style 3-D conv net with BatchNorm3d layers."""
    return nn.Sequential(
        nn.Conv3d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(),
        nn.Conv3d(width, 2 * width, 3, 2, 1, bias=False),
        nn.BatchNorm3d(2 * width),
        nn.ReLU(),
        nn.Conv3d(2 * width, 2 * width, 3, 1, 1, bias=False),
        nn.BatchNorm3d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def tabular(features: int = 16, width: int = 32) -> nn.Module:
    """A tabular model whose first layer is a BatchNorm1d on the raw features."""
    return nn.Sequential(
        nn.BatchNorm1d(features),
        nn.Linear(features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 1),
    )


@dataclass(frozen=True)
class Workload:
    """A model, the shape of one input sample, and how to scale the synthetic inputs."""

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    offset: float = 0.0
    scale: float = 1.0


def make_model(workload: Workload, seed: int = 0) -> nn.Module:
    """Build the workload's model with deterministic weights, in training mode."""
    torch.manual_seed(seed)
    return workload.build().train()


def batch_sizes(num_batches: int, batch: int, *, ragged: bool) -> list[int]:
    """``num_batches`` sizes: all ``batch``, or cycling through ragged sizes up to ``batch``."""
    if not ragged:
        return [batch] * num_batches
    pattern = [batch, max(2, batch // 3), max(2, batch - 5), max(2, batch // 2 + 1), 2 * batch]
    return [pattern[i % len(pattern)] for i in range(num_batches)]


def make_batches(
    workload: Workload, sizes: list[int], *, seed: int = 1, device: str = "cpu"
) -> list[Tensor]:
    """Synthetic float32 batches: ``scale * tilt * (offset + N(0, 1))`` per feature.

    ``tilt`` spreads the features' scales over [0.5, 1.5]; the mean of every feature is
    ``offset`` times its standard deviation.
    """
    return list(iter_batches(workload, sizes, seed=seed, device=device))


def iter_batches(
    workload: Workload, sizes: list[int], *, seed: int = 1, device: str = "cpu"
) -> Iterator[Tensor]:
    """Like :func:`make_batches`, generated lazily so that only one batch is alive."""
    gen = torch.Generator().manual_seed(seed)
    channels = workload.sample_shape[0]
    shape = (channels, *[1] * (len(workload.sample_shape) - 1))
    tilt = torch.linspace(0.5, 1.5, channels, dtype=torch.float64).reshape(shape)
    for size in sizes:
        z = torch.randn((size, *workload.sample_shape), generator=gen, dtype=torch.float64)
        x = workload.scale * (workload.offset + z) * tilt
        yield x.to(torch.float32).to(device)


CNN = Workload("cnn", lambda: resnet_cnn(16, 1), (3, 32, 32))
MLP = Workload("mlp", lambda: bn_mlp(64, 256, 6), (64,))
CONV3D = Workload("conv3d", lambda: conv3d_net(8), (3, 8, 24, 24))
RESNET18 = Workload("resnet18 64x64", lambda: resnet(18), (3, 64, 64))
RESNET50 = Workload("resnet50 64x64", lambda: resnet(50), (3, 64, 64))
DETECTOR = Workload("detector r18-fpn 64x64", Detector, (3, 64, 64))


def tabular_workload(ratio: float) -> Workload:
    """The tabular model on features whose mean is ``ratio`` times their spread."""
    return Workload(f"tabular mean={ratio:g}*std", lambda: tabular(16, 32), (16,), ratio, 1.0)


def cnn_width(width: int) -> Workload:
    """The ResNet-style CNN with its first stage ``width`` channels wide."""
    return Workload(f"cnn width {width}", lambda: resnet_cnn(width, 1), (3, 32, 32))
