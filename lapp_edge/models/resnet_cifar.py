"""CIFAR-style ResNet-20/32/56/110 (He et al. 2016, 3 stages of 16/32/64 channels).

Shortcuts that change shape use a 1x1 conv + BN projection (option B), which exports to
plain ONNX convs. The inner conv of each basic block is prunable. With `coupled=True` each
stage's residual stream is prunable too, as one group: the stem (stage 1, whose first
shortcut is the identity) or the stage's projection shortcut, and every block's second conv,
all summed by the residual adds; its consumers are each block's first conv, the next stage's
first conv and projection, and the classifier.

A block's inner conv may keep zero channels (`lapp-edge train --block-removal`): the block's
residual branch is then removed (`BasicBlock.remove_branch`) and the block computes
relu(shortcut(x) + c), c the per-channel constant the branch gave once its input was all zero.
Removing whole blocks cuts the per-layer costs that narrowing a layer never does.
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

    @property
    def removed(self) -> bool:
        """The residual branch was removed (its inner width pruned to zero)."""
        return self.conv1 is None

    def remove_branch(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the residual branch: conv1 goes, conv2 keeps only the constant it gave a zero
        input (`ConvBN.drop_inputs`; exact for a branch whose inner channels were all masked off),
        and their parameters leave `optimizer`."""
        from lapp_edge.models.slicing import drop_from_optimizer

        if self.conv1 is None:
            return
        dropped = list(self.conv1.parameters()) + self.conv2.drop_inputs()
        self.conv1 = None  # type: ignore[assignment]
        drop_from_optimizer(dropped, optimizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1 is None:
            return self.relu(self.conv2(x) + self.shortcut(x))
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, bypass: bool = False, coupled: bool = False) -> None:
        super().__init__()
        self.coupled = coupled
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
        """Per stage: its residual group (when coupled), then each block's inner conv."""
        stages = [list(getattr(self, name)) for name in ("layer1", "layer2", "layer3")]
        sites = []
        for stage_index, (stage_name, blocks) in enumerate(zip(("layer1", "layer2", "layer3"), stages)):
            if self.coupled:
                first = blocks[0]
                entry = first.shortcut if isinstance(first.shortcut, ConvBN) else self.stem
                consumers: list[nn.Module] = [b.conv1 for b in (blocks if entry is self.stem else blocks[1:]) if b.conv1 is not None]
                if stage_index + 1 < len(stages):
                    following = stages[stage_index + 1][0]
                    consumers += [unit for unit in (following.conv1, following.shortcut) if unit is not None]
                else:
                    consumers.append(self.fc)
                sites.append(PrunableSite(f"{stage_name}.residual", [entry, *(b.conv2 for b in blocks)], [], consumers))
            for index, block in enumerate(blocks):
                if block.conv1 is not None:          # a removed branch has no inner site left
                    sites.append(PrunableSite(f"{stage_name}.{index}.conv1", [block.conv1], [], [block.conv2],
                                              removal=block.remove_branch, branch_index=index))
        return sites
