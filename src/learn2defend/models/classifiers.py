"""The built-in classifiers: a small CNN for CPU runs, Wide ResNets and PreAct ResNet-18.

All take [0, 1] images and normalize first. They end in adaptive average pooling, so one
definition serves 8x8 digits, 28x28 MNIST and 32x32 CIFAR alike; the registry records the
smallest size each one can take.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from learn2defend.models import Normalize, register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by batch norm, which has its own shift.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


# --- small CNN -------------------------------------------------------------------------------


def small_cnn(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], *, pool_each: bool = False
) -> nn.Sequential:
    """Three conv layers (32, 64, 128 channels), global average pooling and a linear layer.

    smallcnn pools once, after the second conv: it trains on 8x8 digits in seconds on a CPU.
    smallcnn-pooled halves the resolution after the first and the second conv instead: on
    32x32 images that is 10 instead of 39 million multiply-adds per image (3.7x cheaper),
    which is what makes CIFAR-sized experiments possible on a CPU.
    """

    def conv_bn(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(_conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU())

    layers: list[tuple[str, nn.Module]] = [("normalize", Normalize(mean, std)), ("conv1", conv_bn(in_channels, 32))]
    if pool_each:
        layers.append(("pool1", nn.MaxPool2d(2)))
    layers += [("conv2", conv_bn(32, 64)), ("pool", nn.MaxPool2d(2)), ("conv3", conv_bn(64, 128)),
               ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(128, num_classes))]
    return nn.Sequential(OrderedDict(layers))


@register_model("smallcnn", min_image_size=2)
def _smallcnn(*, num_classes, in_channels, image_size, mean, std) -> nn.Module:
    return small_cnn(num_classes, in_channels, mean, std)


@register_model("smallcnn-pooled", min_image_size=4)
def _smallcnn_pooled(*, num_classes, in_channels, image_size, mean, std) -> nn.Module:
    return small_cnn(num_classes, in_channels, mean, std, pool_each=True)


# --- pre-activation ResNets ------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv twice (He et al. 2016b).

    The same block serves the Madry / TRADES / RobustBench Wide ResNet (with dropout 0) and
    the Fast-AT / Rice et al. PreAct ResNet-18. When the shape changes, the 1x1 shortcut reads
    the pre-activated input, as in that reference code, so parameter counts match theirs.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


# --- Wide ResNet -----------------------------------------------------------------------------


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016), CIFAR layout: 3 groups, strides 1, 2, 2."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = self._group(widths[0], widths[1], n, stride=1)
        self.block2 = self._group(widths[1], widths[2], n, stride=2)
        self.block3 = self._group(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # The reference initialisation; robust-training recipes are tuned with it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _register_wrn(depth: int, widen: int) -> None:
    # Two stride-2 stages: below 4 pixels the last stage would see only padding.
    @register_model(f"wrn-{depth}-{widen}", min_image_size=4)
    def build(*, num_classes, in_channels, image_size, mean, std) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels, mean, std)


for _depth, _widen in [(16, 4), (28, 10), (34, 4), (34, 10)]:
    _register_wrn(_depth, _widen)


# --- PreAct ResNet-18 ------------------------------------------------------------------------


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for CIFAR-sized inputs: 4 stages of 2 blocks, 64 to 512 channels."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(in_channels, 64)
        stages, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.bn(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model("preact-resnet18", min_image_size=8)  # three stride-2 stages
def _preact_resnet18(*, num_classes, in_channels, image_size, mean, std) -> nn.Module:
    return PreActResNet18(num_classes, in_channels, mean, std)
