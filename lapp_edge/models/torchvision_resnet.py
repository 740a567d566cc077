"""torchvision's ResNet-18/34/50 for ImageNet-size inputs, made LAPP-ready.

The torchvision model is built as is (random init with zero_init_residual, no weights download); each prunable
conv and the BatchNorm after it are wrapped into one `ConvBN` (the block's own BN slot
becomes an Identity), so the block's forward is unchanged. Prunable: conv1 of a basic
block; conv1 and conv2 of a bottleneck. With `coupled=True` the stem conv, each block's last
conv and each downsample projection are wrapped too, and each stage's residual stream is one
group (its projection, or the stem where the first shortcut is the identity, plus every
block's last conv; consumers: the blocks' first convs, the next stage's first conv and
projection, the classifier). Where the first shortcut projects (ResNet-50), the stem is a
site of its own.

A basic block (ResNet-18/34) may lose its residual branch (`lapp-edge train --block-removal`): when its
conv1 keeps zero channels the block is replaced by a `RemovedBasicBlock`, relu(c + shortcut(x)), c the
per-channel constant conv2's BatchNorm gives a zero input, exactly what the fully masked block computed.
A bottleneck (ResNet-50) is not removed: its conv2 reads a constant, not zero, once conv1 is gone, so the
branch's constant and its cost would need both inner sites at zero.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite


class RemovedBasicBlock(nn.Module):
    """A torchvision basic block whose residual branch was removed: relu(conv2's constant + shortcut(x)).
    `conv2` is the branch's last unit, input-free (`ConvBN.drop_inputs`), under its old name, so the
    block's state-dict keys stay those of a removed block rebuilt from a spec."""

    def __init__(self, conv2: ConvBN, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv2 = conv2
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    removed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(x) + identity)


def _remove_basic_branch(layer: nn.Sequential, index: int, optimizer: torch.optim.Optimizer | None) -> None:
    """Replace basic block `layer[index]` by a `RemovedBasicBlock`; conv1's and conv2's parameters leave
    `optimizer` (conv2's BatchNorm stays, holding the constant)."""
    from lapp_edge.models.slicing import drop_from_optimizer

    block = layer[index]
    if isinstance(block, RemovedBasicBlock):
        return
    last = block.conv2 if isinstance(block.conv2, ConvBN) else ConvBN(0, 0, 0, conv=block.conv2, bn=block.bn2)
    dropped = list(block.conv1.parameters()) + last.drop_inputs()
    layer[index] = RemovedBasicBlock(last, block.downsample)
    drop_from_optimizer(dropped, optimizer)


def _wrap(block: nn.Module, conv_name: str, bn_name: str, bypass: bool) -> ConvBN:
    unit = ConvBN(0, 0, 0, conv=getattr(block, conv_name), bn=getattr(block, bn_name), bypass=bypass)
    setattr(block, conv_name, unit)
    setattr(block, bn_name, nn.Identity())
    return unit


class TorchvisionResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, bypass: bool = False, coupled: bool = False) -> None:
        super().__init__()
        self.coupled = coupled
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
            if coupled:
                _wrap(block, *(("conv3", "bn3") if isinstance(block, resnet.Bottleneck) else ("conv2", "bn2")), False)
                if block.downsample is not None:
                    conv, bn = block.downsample[0], block.downsample[1]
                    block.downsample = ConvBN(0, 0, 0, conv=conv, bn=bn)
        if coupled:
            _wrap(self.net, "conv1", "bn1", False)

    def _blocks(self) -> list[nn.Module]:
        return [b for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4) for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prunable_sites(self) -> list[PrunableSite]:
        sequentials = [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]
        layers = [list(layer) for layer in sequentials]
        sites = []
        if self.coupled and layers[0][0].downsample is not None:
            sites.append(PrunableSite("net.conv1", [self.net.conv1], [], [layers[0][0].conv1, layers[0][0].downsample]))
        for layer_index, blocks in enumerate(layers):
            if self.coupled:
                first = blocks[0]
                entry = first.downsample if first.downsample is not None else self.net.conv1
                last = [b.conv3 if hasattr(b, "conv3") else b.conv2 for b in blocks]
                # a removed block reads nothing but through its shortcut (its conv1 is gone)
                consumers: list[nn.Module] = [b.conv1 for b in (blocks if entry is self.net.conv1 else blocks[1:])
                                              if not isinstance(b, RemovedBasicBlock)]
                if layer_index + 1 < len(layers):
                    following = layers[layer_index + 1][0]
                    consumers += [unit for unit in (getattr(following, "conv1", None), following.downsample) if unit is not None]
                else:
                    consumers.append(self.net.fc)
                sites.append(PrunableSite(f"net.layer{layer_index + 1}.residual", [entry, *last], [], consumers))
            for block_index, block in enumerate(blocks):
                if isinstance(block, RemovedBasicBlock):   # a removed branch has no inner site left
                    continue
                prefix = f"net.layer{layer_index + 1}.{block_index}"
                bottleneck = hasattr(block, "conv3")
                removal = None if bottleneck else partial(_remove_basic_branch, sequentials[layer_index], block_index)
                sites.append(PrunableSite(f"{prefix}.conv1", [block.conv1], [], [block.conv2], removal=removal,
                                          branch_index=block_index))
                if bottleneck:
                    sites.append(PrunableSite(f"{prefix}.conv2", [block.conv2], [], [block.conv3]))
        return sites
