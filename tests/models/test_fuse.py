"""BN and bypass folding of a stride-2 unit (whole families: test_model_families.py)."""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.fuse import fuse_model
from lapp_edge.models import ConvBN


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)


def test_stride_two_bypass_folds_into_centre_tap() -> None:
    generator = torch.Generator().manual_seed(2)
    unit = ConvBN(8, 16, 3, stride=2, bypass=True).eval()
    randomize_batchnorm(unit, generator)
    fused = fuse_model(unit)
    x = torch.randn(2, 8, 15, 15, generator=generator)
    with torch.no_grad():
        assert torch.allclose(unit(x), fused(x), atol=1e-5)
