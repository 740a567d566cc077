"""MobileNetV2, CIFAR variant (stride 1 in the stem and the first stride-2 stage).

The expansion 1x1 conv of each inverted-residual block with t > 1 is prunable; its
channels run one-to-one through the depthwise conv (a follower) into the projection conv.
With `coupled=True` also: the stem (followed by the first block's depthwise conv), each
stage's projection group (the projections of all its blocks, summed by the residual adds;
consumers: the next blocks' expansions or the head) and the head (consumer: the classifier).

A block with an identity shortcut may lose its whole branch (`lapp-edge train --block-removal`): when
its expansion keeps zero channels, the expansion and depthwise convs go and the projection keeps only
the per-channel constant its BatchNorm gives a zero input (`ConvBN.drop_inputs`), so the block computes
x + c, exactly what the fully masked block computed. The first block of each stage changes the width
(or the stride) and has no identity shortcut: it is never removed.
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

    @property
    def removed(self) -> bool:
        """The residual branch was removed (its expansion pruned to zero channels)."""
        return self.depthwise is None

    def remove_branch(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the residual branch: the expansion and depthwise convs go, the projection keeps
        only the constant it gave a zero input (exact for a branch whose hidden channels were all
        masked off), and their parameters leave `optimizer`. ValueError for a block without an
        identity shortcut (its output would be a constant)."""
        from lapp_edge.models.slicing import drop_from_optimizer

        if not self.use_residual:
            raise ValueError("a block without an identity shortcut cannot be removed")
        if self.depthwise is None:
            return
        branch = [self.expand, self.depthwise]
        dropped = [p for unit in branch if unit is not None for p in unit.parameters()] + self.project.drop_inputs()
        self.expand, self.depthwise = None, None  # type: ignore[assignment]
        drop_from_optimizer(dropped, optimizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise is None:
            return x + self.project(x)
        h = self.act(self.expand(x)) if self.expand is not None else x
        h = self.project(self.act(self.depthwise(h)))
        return x + h if self.use_residual else h


class CifarMobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, bypass: bool = False, coupled: bool = False) -> None:
        super().__init__()
        self.coupled = coupled
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

    def stages(self) -> list[list[int]]:
        """Block indices of each stage (blocks sharing one output width, as configured)."""
        result, start = [], 0
        for _, _, repeats, _ in MOBILENETV2_CIFAR_CONFIG:
            result.append(list(range(start, start + repeats)))
            start += repeats
        return result

    def prunable_sites(self) -> list[PrunableSite]:
        blocks = list(self.blocks)
        sites = []
        if self.coupled and blocks[0].expand is None:
            sites.append(PrunableSite("stem", [self.stem], [blocks[0].depthwise], [blocks[0].project]))
        stages = self.stages()
        for stage_index, indices in enumerate(stages):
            branch_index = 0                       # the position among the stage's residual branches
            for index in indices:
                block = blocks[index]
                if block.expand is not None:
                    removal = block.remove_branch if block.use_residual else None
                    sites.append(PrunableSite(f"blocks.{index}.expand", [block.expand], [block.depthwise], [block.project],
                                              removal=removal, branch_index=branch_index))
                branch_index += int(block.use_residual)
            if self.coupled:
                # a removed block reads nothing (its expansion is gone)
                consumers: list[nn.Module] = [blocks[i].expand for i in indices[1:] if blocks[i].expand is not None]
                if stage_index + 1 < len(stages):
                    consumers.append(blocks[stages[stage_index + 1][0]].expand)
                else:
                    consumers.append(self.head)
                sites.append(PrunableSite(f"stage{stage_index}.projection", [blocks[i].project for i in indices], [], consumers))
        if self.coupled:
            sites.append(PrunableSite("head", [self.head], [], [self.classifier]))
        return sites
