"""MobileNetV2, CIFAR variant (stride 1 in the stem and the first stride-2 stage).

The expansion 1x1 conv of each inverted-residual block with t > 1 is prunable; its
channels run one-to-one through the depthwise conv (a follower) into the projection conv.
"""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite

# (expansion t, output channels c, repeats n, first stride s)
MOBILENETV2_CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, bypass: bool) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden, 1, 1, bypass=bypass) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, 1)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.expand(x)) if self.expand is not None else x
        h = self.project(self.act(self.depthwise(h)))
        return x + h if self.use_residual else h


class CifarMobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, bypass: bool = False) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, 32, 3, 1)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        width_in = 32
        for expansion, width, repeats, stride in MOBILENETV2_CIFAR_CONFIG:
            for index in range(repeats):
                blocks.append(InvertedResidual(width_in, width, stride if index == 0 else 1, expansion, bypass))
                width_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(width_in, 1280, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.stem(x)))
        x = self.act(self.head(x))
        return self.classifier(torch.flatten(self.pool(x), 1))

    def prunable_sites(self) -> list[PrunableSite]:
        sites = []
        for index, block in enumerate(self.blocks):
            if block.expand is not None:
                sites.append(PrunableSite(f"blocks.{index}.expand", block.expand, [block.depthwise], [block.project]))
        return sites
