"""VGG-16-BN, CIFAR variant: 13 convs, a global average pool and one linear classifier.

Max-pools use ceil_mode so the five halvings work on 28x28 inputs as well as 32x32.
Every conv is prunable; the last one feeds the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite

VGG16_CONFIG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class CifarVGG(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, bypass: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [ConvBN(width_in, int(item), 3, 1, bypass=bypass), nn.ReLU(inplace=True)]
                width_in = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def prunable_sites(self) -> list[PrunableSite]:
        units = [(f"features.{i}", m) for i, m in enumerate(self.features) if isinstance(m, ConvBN)]
        sites = []
        for position, (name, unit) in enumerate(units):
            consumer: nn.Module = units[position + 1][1] if position + 1 < len(units) else self.classifier
            sites.append(PrunableSite(name, [unit], [], [consumer]))
        return sites
