"""CIFAR-style ResNet-20/32/56/110 (He et al. 2016, 3 stages of 16/32/64 channels).

Shortcuts that change shape use a 1x1 conv + BN projection (option B), which exports to
plain ONNX convs. The inner conv of each basic block is prunable; the block outputs are
tied together by the residual adds and stay at full width.
"""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, bypass: bool) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, channels, 3, stride, bypass=bypass)
        self.conv2 = ConvBN(channels, channels, 3, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = ConvBN(in_channels, channels, 1, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, bypass: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = ConvBN(in_channels, 16, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        width_in = 16
        for stage_index, width in enumerate((16, 32, 64)):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(width_in, width, stride, bypass))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def prunable_sites(self) -> list[PrunableSite]:
        sites = []
        for stage_name in ("layer1", "layer2", "layer3"):
            for index, block in enumerate(getattr(self, stage_name)):
                sites.append(PrunableSite(f"{stage_name}.{index}.conv1", block.conv1, [], [block.conv2]))
        return sites
