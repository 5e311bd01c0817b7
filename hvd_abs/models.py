"""Classifiers by name: small nets for digits, the paper's C1, CIFAR ResNet-20, any torchvision classifier.

build_model returns nn.Sequential(normalize, net): `normalize` is a fixed per-channel
(x - mean) / std held in buffers (nn.Identity when no statistics are given), and `net` is the
classifier. Inputs are therefore [0, 1] images, and an input-space attack such as FGSM works on
the [0, 1] pixel scale with no conversion of eps. The state_dict keys are the same with or without
statistics apart from the two buffers ("normalize.mean", "normalize.std").

Initialisation draws from torch's global RNG only, so torch.manual_seed(s) fixes the weights.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hvd_abs.errors import UserError

log = logging.getLogger(__name__)

_TORCHVISION_PREFIX = "tv:"


class Normalize(nn.Module):
    """(x - mean) / std per channel (dim 1 of x: (N, C, H, W) images, or (N, C, ...) of any rank),
    with mean and std as buffers (saved, moved by .to(), never trained).

    A channel with std 0 (a constant channel) is divided by 1 instead, so the output stays finite.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.where(s > 1e-8, s, torch.ones_like(s))
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # (the buffers keep their (1, C, 1, 1) shape: checkpoints hold them so)
            shape = (1, -1, *([1] * (x.dim() - 2)))
            return (x - self.mean.view(shape)) / self.std.view(shape)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.mean.shape[1]}"


class MLP(nn.Module):
    """Flatten -> Linear+ReLU per hidden width (default (64, 64)) -> Linear. No BatchNorm, so the
    loss of a batch is the mean of per-sample losses: accumulation over micro-batches is exact."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A small BatchNorm CNN for 8x8 digits (about 56k parameters), any input size >= 2x2:
    conv3x3(32), conv3x3(64), maxpool 2, conv3x3(64), global average pool, Linear."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, 3),
            *_conv_bn_relu(32, 64, 3),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 64, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class C1(nn.Module):
    """The paper's C1: conv5x5(64)+BN+ReLU+maxpool2, conv5x5(64)+BN+ReLU+maxpool2, FC 384-192-classes.

    On 3x32x32 the flatten is 64x8x8 = 4096 and the net has 1,756,682 parameters (about 1.76M);
    the flatten size follows in_shape (H // 4 x W // 4).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise UserError(f"model c1 needs images of at least 4x4, got {h}x{w}; pass a larger image size")
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (h // 4) * (w // 4), 384), nn.ReLU(inplace=True),
            nn.Linear(384, 192), nn.ReLU(inplace=True),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two conv3x3+BN with an identity (or option A/B) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.shortcut = _ShortcutA((cout - cin) // 2)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016, sec. 4.2): conv3x3(16), three stages of n blocks at 16/32/64
    channels (stride 2 at stages 2 and 3), global average pool, Linear. depth = 6n + 2 (20 -> n = 3,
    269,722 parameters with option A shortcuts and 10 classes). Conv and Linear weights use He (fan-out)
    normal init, as in the paper."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise UserError(f"ResNet shortcut must be 'A' (zero padding) or 'B' (1x1 conv), got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, shortcut))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 64)
        return self.fc(out)


class _RepeatChannels(nn.Module):
    """Grey (B, 1, H, W) -> (B, 3, H, W), for torchvision nets built for RGB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def _torchvision_model(arch: str, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if arch not in valid:
        raise UserError(f"unknown torchvision classifier {arch!r}; valid: "
                        + ", ".join(f"{_TORCHVISION_PREFIX}{v}" for v in valid))
    c = in_shape[0]
    if c not in (1, 3):
        raise UserError(f"torchvision models take 1 or 3 channel images, got {c} channels")
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if arch in ("inception_v3", "googlenet"):
        # Auxiliary heads change the training-mode output type; the trainer expects plain logits.
        kwargs.update(aux_logits=False, init_weights=True)
    net = torchvision.models.get_model(arch, **kwargs)
    return nn.Sequential(_RepeatChannels(), net) if c == 1 else net


_BUILDERS: dict[str, Callable[[int, tuple[int, int, int]], nn.Module]] = {
    "mlp": lambda k, s: MLP(s[0] * s[1] * s[2], k),
    "cnn": lambda k, s: SmallCNN(s[0], k),
    "c1": lambda k, s: C1(s, k),
    "resnet20": lambda k, s: CifarResNet(s[0], k, depth=20, shortcut="A"),
}


def list_models(include_torchvision: bool = False) -> list[str]:
    """Names build_model accepts: the built-in ones, plus every "tv:<name>" when include_torchvision
    (default False, since that imports torchvision)."""
    names = list(_BUILDERS)
    if include_torchvision:
        import torchvision

        names += [_TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    return names


def build_model(name: str, num_classes: int, in_shape: tuple[int, int, int], mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> nn.Module:
    """Build a classifier taking [0, 1] images of shape in_shape (C, H, W) to num_classes logits.

    Args:
        name: "mlp", "cnn", "c1", "resnet20", or "tv:<torchvision classifier>" such as "tv:resnet18"
            (random weights).
        num_classes: size of the output.
        in_shape: (C, H, W) of one input image.
        mean, std: per-channel input statistics (default None: no normalisation). When given, the
            model's first op is (x - mean) / std from fixed buffers.

    Returns:
        nn.Sequential with children "normalize" (Normalize or nn.Identity) and "net".

    Raises:
        UserError: unknown name, or shapes or statistics that do not fit.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    shape = tuple(in_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"in_shape must be (C, H, W) of positive integers, got {in_shape!r}")
    shape3: tuple[int, int, int] = (shape[0], shape[1], shape[2])
    if (mean is None) != (std is None):
        raise UserError("give both mean and std for input normalisation, or neither")
    if mean is not None and std is not None and not (len(mean) == len(std) == shape3[0]):
        raise UserError(f"mean and std need one value per channel ({shape3[0]}), got {len(mean)} and {len(std)}")

    key = name.strip()
    if key.startswith(_TORCHVISION_PREFIX):
        net = _torchvision_model(key[len(_TORCHVISION_PREFIX):], num_classes, shape3)
    elif key.lower() in _BUILDERS:
        net = _BUILDERS[key.lower()](num_classes, shape3)
    else:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(list_models())}, or tv:<name> for any "
                        f"torchvision classifier (e.g. tv:resnet18)")
    normalize: nn.Module = Normalize(mean, std) if mean is not None and std is not None else nn.Identity()
    model = nn.Sequential(OrderedDict(normalize=normalize, net=net))
    log.debug("model %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
