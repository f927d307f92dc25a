"""The paper's models.  Each splits into ``features`` (the representation) and
``head`` (the classifier), so representation-based methods such as MOON work
on every model without special cases; ``forward`` is ``head(features(x))``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .errors import ConfigError


class FLModel(nn.Module):
    """Common shape of every model: logits = head(features(x))."""

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(FLModel):
    """LeNet-style CNN of the paper for 32x32 images (62,006 parameters for CIFAR-10)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def features(self, x):
        # The paper's order is conv -> ReLU -> pool.  ReLU is monotone, so pooling first gives the same
        # values and the same gradients (tests/test_models.py checks it bit for bit) with a quarter of
        # the ReLU work; measured 2-3% of a training step on the test CPU.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def head(self, h):
        return self.fc3(h)


class CNNFemnist(FLModel):
    """The paper's CNN for 28x28 FEMNIST images (pool before ReLU, as specified)."""

    def __init__(self, num_classes: int = 62, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def features(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.relu(self.fc1(torch.flatten(x, 1)))

    def head(self, h):
        return self.fc2(h)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = self.expansion * planes
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != out_planes
            else None
        )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class ResNet20(FLModel):
    """The paper's "ResNet-20": pre-activation bottleneck blocks, 2 per stage, widths 16/32/64."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for s in (stride, 1):
                blocks.append(PreActBottleneck(in_planes, planes, s))
                in_planes = planes * PreActBottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)

    def features(self, x):
        out = self.layers(self.conv1(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def head(self, h):
        return self.linear(h)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(FLModel):
    """VGG-16 with BatchNorm for 32x32 inputs (33,646,666 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        )
        self.classifier = nn.Linear(4096, num_classes)

    def features(self, x):
        return self.fc(torch.flatten(self.body(x), 1))

    def head(self, h):
        return self.classifier(h)


# name -> (constructor, the input side length it needs)
MODELS: dict[str, tuple[Callable[..., FLModel], int]] = {
    "cnn": (CNN, 32),
    "cnn_femnist": (CNNFemnist, 28),
    "resnet20": (ResNet20, 32),
    "vgg16": (VGG16, 32),
}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int | None = None) -> FLModel:
    """Build a model by name, checking that the data's image size fits it."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    ctor, side = MODELS[name]
    if image_size is not None and image_size != side:
        raise ConfigError(f"model '{name}' needs {side}x{side} images, the data set has {image_size}x{image_size}")
    return ctor(num_classes=num_classes, in_channels=in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
