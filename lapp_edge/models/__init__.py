"""Model registry: one constructor per name, all taking in_channels, num_classes, bypass and coupled.

`coupled=True` makes a family's residual-coupled channels prunable as groups (see each
family's `prunable_sites`); `coupled=False` gives the inner-conv sites only (the layout of runs
made before coupled groups existed, and the "groups off" ablation).

Besides the registry names, a model can be named by reference: `torchvision:<name>` or
`module:function` (a user's own model, made LAPP-ready by tracing: `models/traced.py`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.models.mobilenetv2 import CifarMobileNetV2
from lapp_edge.models.resnet_cifar import CifarResNet
from lapp_edge.models.torchvision_resnet import TorchvisionResNet
from lapp_edge.models.units import ConvBN, PrunableSite
from lapp_edge.models.vgg import CifarVGG

ModelBuilder = Callable[[int, int, bool, bool], nn.Module]     # (in_channels, num_classes, bypass, coupled)
# the registry models whose sites have a `removal` (`--block-removal`), for the messages that refuse the others
BLOCK_REMOVAL_MODELS = "the CIFAR ResNets resnet20/32/56/110, resnet18/34 and mobilenetv2"

MODEL_BUILDERS: dict[str, ModelBuilder] = {
    "resnet20": lambda c, n, b, g: CifarResNet(20, c, n, b, g),
    "resnet32": lambda c, n, b, g: CifarResNet(32, c, n, b, g),
    "resnet56": lambda c, n, b, g: CifarResNet(56, c, n, b, g),
    "resnet110": lambda c, n, b, g: CifarResNet(110, c, n, b, g),
    "vgg16_bn": lambda c, n, b, g: CifarVGG(c, n, b),
    "mobilenetv2": lambda c, n, b, g: CifarMobileNetV2(c, n, b, g),
    "resnet18": lambda c, n, b, g: TorchvisionResNet(18, c, n, b, g),
    "resnet34": lambda c, n, b, g: TorchvisionResNet(34, c, n, b, g),
    "resnet50": lambda c, n, b, g: TorchvisionResNet(50, c, n, b, g),
}


def build_model(name: str, in_channels: int, num_classes: int, bypass: bool = False, coupled: bool = False,
                input_size: int | None = None) -> nn.Module:
    """Build a dense model by registry name or by reference (UserError for an unknown name). `bypass`
    adds the 1x1 bypass branch to every inner prunable conv; `coupled` makes residual-coupled groups
    prunable; `input_size` (H = W) is what a referenced model is traced at (registry models ignore it)."""
    if ":" in name:  # torchvision:<name> or module:function
        from lapp_edge.models.traced import build_reference

        return build_reference(name, in_channels, num_classes, input_size, bypass, coupled)
    if name not in MODEL_BUILDERS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_BUILDERS)}, "
                        "or torchvision:<name>, or module:function")
    return MODEL_BUILDERS[name](in_channels, num_classes, bypass, coupled)


def rebuild_model(name: str, in_channels: int, num_classes: int, bypass: bool = False, coupled: bool = False,
                  input_size: int | None = None) -> nn.Module:
    """`build_model` for a model that was built before (a spec, a report's dense reference): a user
    model's unprunable layers, named when it was made LAPP-ready, are not named again."""
    import warnings

    from lapp_edge.models.traced import UnprunableLayersWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprunableLayersWarning)
        return build_model(name, in_channels, num_classes, bypass, coupled, input_size)


def prunable_sites(model: nn.Module) -> list[PrunableSite]:
    """The model's prunable sites, in forward order."""
    return model.prunable_sites()  # type: ignore[operator]


__all__ = ["BLOCK_REMOVAL_MODELS", "MODEL_BUILDERS", "ConvBN", "PrunableSite", "build_model", "prunable_sites", "rebuild_model"]
