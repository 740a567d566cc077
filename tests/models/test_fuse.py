"""BN and bypass folding is exact in eval mode, stride-2 convs included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lapp_edge.models.fuse import fuse_model
from lapp_edge.models import ConvBN, build_model


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenetv2"])
def test_fused_model_equals_eval_model(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    model = build_model(name, 1, 10, bypass=True).eval()
    randomize_batchnorm(model, generator)
    fused = fuse_model(model)
    assert not any(isinstance(m, (ConvBN, nn.BatchNorm2d)) for m in fused.modules())
    x = torch.randn(4, 1, 28, 28, generator=generator)
    with torch.no_grad():
        reference, result = model(x), fused(x)
    scale = reference.abs().max().clamp(min=1.0)
    assert float((reference - result).abs().max() / scale) <= 1e-5


def test_stride_two_bypass_folds_into_centre_tap() -> None:
    generator = torch.Generator().manual_seed(2)
    unit = ConvBN(8, 16, 3, stride=2, bypass=True).eval()
    randomize_batchnorm(unit, generator)
    fused = fuse_model(unit)
    x = torch.randn(2, 8, 15, 15, generator=generator)
    with torch.no_grad():
        assert torch.allclose(unit(x), fused(x), atol=1e-5)
