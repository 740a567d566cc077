"""Model registry: one constructor per name, all taking in_channels, num_classes and bypass."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.models.mobilenetv2 import CifarMobileNetV2
from lapp_edge.models.resnet_cifar import CifarResNet
from lapp_edge.models.torchvision_resnet import TorchvisionResNet
from lapp_edge.models.units import ConvBN, PrunableSite
from lapp_edge.models.vgg import CifarVGG

ModelBuilder = Callable[[int, int, bool], nn.Module]

MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "resnet20": lambda c, n, b: CifarResNet(20, c, n, b),
    "resnet32": lambda c, n, b: CifarResNet(32, c, n, b),
    "resnet56": lambda c, n, b: CifarResNet(56, c, n, b),
    "resnet110": lambda c, n, b: CifarResNet(110, c, n, b),
    "vgg16_bn": lambda c, n, b: CifarVGG(c, n, b),
    "mobilenetv2": lambda c, n, b: CifarMobileNetV2(c, n, b),
    "resnet18": lambda c, n, b: TorchvisionResNet(18, c, n, b),
    "resnet34": lambda c, n, b: TorchvisionResNet(34, c, n, b),
    "resnet50": lambda c, n, b: TorchvisionResNet(50, c, n, b),
}


def build_model(name: str, in_channels: int, num_classes: int, bypass: bool = False) -> nn.Module:
    """Build a dense model by registry name."""
    if name not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name](in_channels, num_classes, bypass)


def prunable_sites(model: nn.Module) -> list[PrunableSite]:
    """The model's prunable sites, in forward order."""
    return model.prunable_sites()  # type: ignore[operator]


__all__ = ["MODEL_BUILDERS", "ConvBN", "PrunableSite", "build_model", "prunable_sites"]
