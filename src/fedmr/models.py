"""The paper's models, and an MLP for data that are not images.  Each splits into ``features`` (the
representation) and ``head`` (the classifier), so representation-based methods such as MOON work
on every model without special cases; ``forward`` is ``head(features(x))``.

The image models take any image size and channel count: layers whose width depends on the image
(the CNNs' first fully connected layer) are sized from the input shape, so for the paper's 32x32
inputs every model is exactly the paper's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, PluginError, did_you_mean
from .imports import a_noun, describe, first_line, is_import_string, resolve_callable, where


class FLModel(nn.Module):
    """Common shape of every model: logits = head(features(x))."""

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ImageSize = int | tuple[int, int]


def _side_pair(image_size: ImageSize) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _after_two_conv5_pools(image_size: ImageSize) -> int:
    """Pixels per map after conv5 -> pool2 -> conv5 -> pool2 (5x5 for 32x32, 4x4 for 28x28)."""
    h, w = _side_pair(image_size)
    return (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)


class CNN(FLModel):
    """LeNet-style CNN of the paper (62,006 parameters for 32x32 CIFAR-10); fc1 is sized from the image."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: ImageSize = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * _after_two_conv5_pools(image_size), 120)
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
    """The paper's CNN for 28x28 FEMNIST images (pool before ReLU, as specified); fc1 is sized from the image."""

    def __init__(self, num_classes: int = 62, in_channels: int = 1, image_size: ImageSize = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * _after_two_conv5_pools(image_size), 256)
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
    """The paper's "ResNet-20": pre-activation bottleneck blocks, 2 per stage, widths 16/32/64
    (global average pooling: any image size)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: ImageSize = 32):
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
        return out.mean(dim=(2, 3))  # global average pooling; adaptive_avg_pool2d has no vmap rule for channels_last

    def head(self, h):
        return self.linear(h)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(FLModel):
    """VGG-16 with BatchNorm (33,646,666 parameters for 32x32 inputs and 10 classes); the first fully
    connected layer is sized from the image (512 x (H/32) x (W/32) inputs)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: ImageSize = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)  # VGG16_LAYOUT: widths, and "M" for a pooling layer
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.body = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(512 * (_side_pair(image_size)[0] // 32) * (_side_pair(image_size)[1] // 32), 4096),
            nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        )
        self.classifier = nn.Linear(4096, num_classes)

    def features(self, x):
        return self.fc(torch.flatten(self.body(x), 1))

    def head(self, h):
        return self.classifier(h)


class MLP(FLModel):
    """Two hidden layers of 200 ReLU units on the flattened sample (any shape; integers are cast to
    floats): the built-in model for data that are not images, e.g. tabular features."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], hidden: int = 200):
        super().__init__()
        features = 1
        for size in input_shape:
            features *= int(size)
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def features(self, x):
        x = torch.flatten(x, 1).float()
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def head(self, h):
        return self.fc3(h)


# name -> (image constructor, the smallest image side it takes); the MLP takes any shape
MODELS: dict[str, tuple[Callable[..., FLModel], int]] = {
    "cnn": (CNN, 16),
    "cnn_femnist": (CNNFemnist, 16),
    "resnet20": (ResNet20, 1),
    "vgg16": (VGG16, 32),
    "mlp": (MLP, 0),
}


def check_model_name(name: str) -> None:
    """A built-in model, "auto", or an import string (which the plug-in checks resolve)."""
    if name != "auto" and ":" not in name and name not in MODELS:
        raise ConfigError(f"unknown model '{name}' (choose from {', '.join(MODELS)}, \"auto\", or name your own as "
                          f"'package.module:factory'){did_you_mean(name, [*MODELS, 'auto'])}")


def check_fits(name: str, input_shape: Sequence[int]) -> None:
    """Raise ConfigError unless model ``name`` takes samples of ``input_shape`` (without the batch dim)."""
    check_model_name(name)
    if name == "mlp":
        return
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ConfigError(f"model '{name}' needs images, samples of shape (C, H, W); the data set's samples are "
                          f"{shape} (use model = \"mlp\" or \"auto\")")
    side = MODELS[name][1]
    if min(shape[1:]) < side:
        raise ConfigError(f"model '{name}' needs images of at least {side}x{side}, the data set has "
                          f"{shape[2]}x{shape[1]} (use model = \"auto\" or another model)")


def auto_model(preferred: str, input_shape: Sequence[int]) -> str:
    """``model = "auto"``: the data set's preferred model when it fits its samples, else the MLP."""
    try:
        check_fits(preferred, input_shape)
    except ConfigError:
        return "mlp"
    return preferred


def build_model(name: str, num_classes: int, in_channels: int | None = None, image_size: ImageSize | None = None,
                *, input_shape: Sequence[int] | None = None) -> FLModel:
    """Build a built-in model by name for samples of ``input_shape`` (or ``in_channels`` images of
    ``image_size``, 32x32 when not given), checking that it can take them."""
    if input_shape is None:
        h, w = _side_pair(32 if image_size is None else image_size)
        input_shape = (3 if in_channels is None else in_channels, h, w)
    shape = tuple(int(s) for s in input_shape)
    check_fits(name, shape)
    ctor = MODELS[name][0]
    if name == "mlp":
        return ctor(num_classes=num_classes, input_shape=shape)
    return ctor(num_classes=num_classes, in_channels=shape[0], image_size=(shape[1], shape[2]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- user models: model = "pkg.mod:factory" or a factory object ----------------------------------
class ModelFactory(Protocol):
    """``factory(num_classes, input_shape) -> nn.Module``; ``input_shape`` excludes the batch dimension."""

    def __call__(self, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module: ...


def build_user_model(key: str, factory: Callable[..., Any], num_classes: int, input_shape: tuple[int, ...],
                     label: str) -> nn.Module:
    try:
        model = factory(num_classes, tuple(input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise PluginError(f"{where(key)}: {label}({num_classes}, {tuple(input_shape)}) raised "
                          f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"{where(key)}: {label}(num_classes, input_shape) returned "
                          f"{a_noun(type(model).__name__)}, expected a torch.nn.Module")
    return model


def check_model_output(key: str, model: nn.Module, sample: torch.Tensor, num_classes: int, label: str) -> None:
    """One forward pass on a batch of two samples (eval mode, no gradients): the output must be
    (batch, num_classes) logits, and the model must have parameters to train.  Run once, before
    round 1, so a bad model fails in a second."""
    if not any(p.requires_grad for p in model.parameters()):
        raise PluginError(f"{where(key)}: {label} has no trainable parameters (none with requires_grad), so local "
                          "training would have nothing to update")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # noqa: BLE001 - the user's forward failed
        raise PluginError(f"{where(key)}: {label} fails on a batch of samples of shape "
                          f"{tuple(sample.shape)}: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{where(key)}: {label} returned {a_noun(type(out).__name__)}, expected a tensor of logits")
    want = (sample.shape[0], num_classes)
    if tuple(out.shape) != want:
        raise PluginError(f"{where(key)}: {label} gives output of shape {tuple(out.shape)} on a batch of "
                          f"{sample.shape[0]}; expected (batch, num_classes) = {want}")
    if not out.is_floating_point():
        raise PluginError(f"{where(key)}: {label} gives {out.dtype} output; expected float logits")


def model_builder(spec: str | Callable[..., Any], data: Any,
                  key: str = "model") -> tuple[str, Callable[[], nn.Module], bool]:
    """(the model's name, a zero-argument builder, whether it is user code to check on a sample batch)
    for a built-in name, "auto", an import string or a factory object."""
    shape = tuple(int(s) for s in data.train_x.shape[1:])
    if isinstance(spec, str) and not is_import_string(spec):
        name = data.default_model if spec == "auto" else spec
        check_fits(name, shape)  # refuses a model that cannot take this data, before anything is built
        return name, lambda: build_model(name, data.num_classes, input_shape=shape), False
    if isinstance(spec, str):
        factory, label = resolve_callable(key, spec), spec
    else:
        if isinstance(spec, nn.Module):
            raise PluginError(f"{key}= takes a factory(num_classes, input_shape) or a class, not a built model; "
                              f"wrap it: lambda num_classes, input_shape: {type(spec).__name__}(...)")
        if not callable(spec):
            raise PluginError(f"{key}= takes a factory(num_classes, input_shape) or a class, got {a_noun(type(spec).__name__)}")
        factory, label = spec, describe(spec)
    return label, lambda: build_user_model(key, factory, data.num_classes, shape, label), True
