"""torchvision's ResNet-18/34/50 for ImageNet-size inputs, made LAPP-ready.

The torchvision model is built as is (random init with zero_init_residual, no weights download); each prunable
conv and the BatchNorm after it are wrapped into one `ConvBN` (the block's own BN slot
becomes an Identity), so the block's forward is unchanged. Prunable: conv1 of a basic
block; conv1 and conv2 of a bottleneck.
"""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite


def _wrap(block: nn.Module, conv_name: str, bn_name: str, bypass: bool) -> ConvBN:
    unit = ConvBN(0, 0, 0, conv=getattr(block, conv_name), bn=getattr(block, bn_name), bypass=bypass)
    setattr(block, conv_name, unit)
    setattr(block, bn_name, nn.Identity())
    return unit


class TorchvisionResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, bypass: bool = False) -> None:
        super().__init__()
        # imported here: torchvision takes seconds to import and only these models need it
        from torchvision.models import resnet

        builders = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}
        # zero_init_residual: the last BN of every residual branch starts at gamma = 0, so each block
        # starts as the identity (Goyal et al. 2017). Without it, a ResNet-18 trained 16 steps at lr 0.1
        # on Fashion-MNIST reached logits of ~2400 (with it ~10) and 0.19 top-1 instead of 0.34
        # (docs/RESULTS.md, "ResNet-18 logit scale").
        self.net = builders[depth](weights=None, num_classes=num_classes, zero_init_residual=True)
        if in_channels != 3:
            self.net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(self.net.conv1.weight, mode="fan_out", nonlinearity="relu")
        for block in self._blocks():
            _wrap(block, "conv1", "bn1", bypass)
            if isinstance(block, resnet.Bottleneck):
                _wrap(block, "conv2", "bn2", bypass)

    def _blocks(self) -> list[nn.Module]:
        return [b for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4) for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prunable_sites(self) -> list[PrunableSite]:
        sites = []
        for layer_index, layer in enumerate((self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4)):
            for block_index, block in enumerate(layer):
                prefix = f"net.layer{layer_index + 1}.{block_index}"
                sites.append(PrunableSite(f"{prefix}.conv1", block.conv1, [], [block.conv2]))
                if hasattr(block, "conv3"):  # a bottleneck
                    sites.append(PrunableSite(f"{prefix}.conv2", block.conv2, [], [block.conv3]))
        return sites
