"""Small models "a user wrote", importable as `tests.models.user_nets:<function>` for the
`--model module:function` tests (each builder takes what the CLI passes where it accepts it)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallNet(nn.Module):
    """Stem, a residual pair, a depthwise-separable block with squeeze-excitation, classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.a = conv_bn(16, 16)
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.expand = conv_bn(16, 32, 1)
        self.depthwise = conv_bn(32, 32, 3, 2, groups=32)
        self.se_squeeze = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        h = self.depthwise(self.expand(x))
        scale = torch.sigmoid(self.se_expand(torch.relu(self.se_squeeze(h.mean((2, 3), keepdim=True)))))
        h = self.project(h * scale)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def small_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return SmallNet(num_classes, in_channels)


class ConcatNet(nn.Module):
    """Two branches concatenated: their convs feed a concatenation and stay at full width."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.left = conv_bn(16, 16)
        self.right = conv_bn(16, 8)
        self.mix = conv_bn(24, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.mix(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(x.mean((2, 3)))


class SigmoidNet(nn.Module):
    """conv+BN followed by a sigmoid (sigmoid(0) = 0.5: a masked channel would not be zero) and a
    conv+BN whose output is added to the network input (which the autograd trace cannot see)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.into_input = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(in_channels))
        self.stem = conv_bn(in_channels, 16)
        self.gated = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.body = conv_bn(16, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.into_input(x)
        x = self.body(torch.sigmoid(self.gated(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class UntraceableNet(nn.Module):
    """A numpy round trip in forward: autograd (and so the tracer) cannot follow it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = conv_bn(in_channels, 16)
        self.head = conv_bn(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.from_numpy(self.body(x).detach().numpy())
        return self.fc(self.head(h).mean((2, 3)))


def untraceable_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return UntraceableNet(num_classes, in_channels)


def no_batchnorm_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Convs without BatchNorm: nothing carries a mask, so nothing is prunable."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def rgb_only_net(num_classes: int = 10) -> nn.Module:
    """Takes no in_channels: always 3 input channels (the CLI's 1-channel Fashion-MNIST does not fit)."""
    return SmallNet(num_classes, 3)


def costly_unprunable_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A wide conv without BatchNorm (unprunable) holds most of the FLOPs; a small conv+BN is prunable."""
    return nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1, bias=False),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


NOT_A_MODEL = 3


def not_a_module(num_classes: int = 10) -> object:
    return {"classes": num_classes}


class ViewFlattenNet(nn.Module):
    """Flattens its 7x7 feature map with `.view`, as many classic CNNs do: that needs NCHW strides, so
    the model cannot run in channels_last."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3, 2)
        self.body = conv_bn(16, 16, 3, 2)
        self.fc = nn.Linear(16 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.fc(x.view(x.size(0), -1))


def view_flatten_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return ViewFlattenNet(num_classes, in_channels)


def too_few_outputs(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Ignores num_classes: 7 logits, fewer than Fashion-MNIST's 10 classes."""
    return SmallNet(7, in_channels)


def too_many_outputs(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Ignores num_classes: 12 logits, two of which would name no class."""
    return SmallNet(12, in_channels)


def exiting_builder(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A builder that calls sys.exit (a script's main pasted into a builder)."""
    raise SystemExit(3)
