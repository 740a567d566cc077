"""Building blocks shared by every model family.

`ConvBN` is a conv followed by BatchNorm, optionally with a parallel linear bypass branch
(a 1x1 conv with its own BatchNorm, same stride). Every prunable conv in every model is a
`ConvBN`, so LAPP, slimming and export see one kind of unit.

During LAPP training a unit can carry an output-channel mask (`channel_mask`, a plain
attribute, never saved). It is applied inside BatchNorm's affine transform,
BN(x) * m = x_hat * (gamma * m) + beta * m, so masking costs no extra pass over the
activations and the mask's gradient comes out of BN's own gamma/beta gradient.

A residual branch whose inner width is pruned to zero is removed (`lapp-edge train --block-removal`;
CIFAR ResNets, torchvision ResNet-18/34, MobileNetV2): its last unit keeps only its BatchNorm and no
conv (`conv is None`), and outputs the per-channel constant that BatchNorm gives a zero input, added
to the shortcut.

`PrunableSite` describes one group of output channels that are kept or removed together
(a coupled-channel group): every unit that produces them (one conv, or every conv whose
outputs a residual add sums: a stage's stem or projection shortcut and each block's last
conv), the depthwise units whose channels follow them one-to-one, and the modules that
consume them as input channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def masked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nn.BatchNorm2d's forward with its affine weight and bias multiplied by `mask`."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    mask = mask.to(x.dtype) if x.dtype != torch.float32 else mask
    return F.batch_norm(
        x,
        bn.running_mean if not bn.training or bn.track_running_stats else None,
        bn.running_var if not bn.training or bn.track_running_stats else None,
        bn.weight * mask, bn.bias * mask, use_batch_stats, momentum, bn.eps,
    )


def batch_norm_of_zeros(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What eval-mode `bn` outputs for a zero input, per channel: beta - gamma * mean / sqrt(var + eps)."""
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)


class ConvBN(nn.Module):
    """kxk conv + BN, plus an optional 1x1 conv + BN bypass summed into the output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bypass: bool = False,
        conv: nn.Conv2d | None = None,
        bn: nn.BatchNorm2d | None = None,
    ) -> None:
        super().__init__()
        self.conv = conv or nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = bn or nn.BatchNorm2d(out_channels)
        self.bypass_conv: nn.Conv2d | None = None
        self.bypass_bn: nn.BatchNorm2d | None = None
        if bypass:
            k = self.conv.kernel_size[0]
            if self.conv.padding[0] != k // 2 or self.conv.kernel_size[0] != self.conv.kernel_size[1]:
                raise ValueError("a ConvBN bypass needs a square kernel with 'same' padding (k // 2)")
            self.bypass_conv = nn.Conv2d(
                self.conv.in_channels, self.conv.out_channels, 1, self.conv.stride,
                0, groups=self.conv.groups, bias=False,
            )
            self.bypass_bn = nn.BatchNorm2d(self.conv.out_channels)
        self.channel_mask: torch.Tensor | None = None
        # "branch": the bypass is its own conv + BN; "reparam": folded into the kxk kernel at every
        # forward (models/reparam.py; set with set_bypass_mode). A plain attribute, never saved.
        self.bypass_mode = "branch"

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels if self.conv is not None else self.bn.num_features

    @property
    def is_depthwise(self) -> bool:
        conv = self.conv
        return conv is not None and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels

    @property
    def input_free(self) -> bool:
        """The unit's inputs were all pruned (`drop_inputs`): it outputs a per-channel constant."""
        return self.conv is None

    @torch.no_grad()
    def drop_inputs(self) -> list[nn.Parameter]:
        """Every input channel was pruned: the conv reads zeros, so the unit's output is what its
        BatchNorm gives a zero input in eval mode, beta - gamma * mean / sqrt(var + eps) per channel.
        That constant is folded into BN's bias (running mean set to 0, so training and eval
        mode give it alike) and the conv and bypass are dropped. Returns the dropped parameters
        (the caller takes them out of an optimizer)."""
        bn = self.bn
        bn.bias.copy_(batch_norm_of_zeros(bn))
        assert bn.running_mean is not None
        bn.running_mean.zero_()
        dropped = [p for module in (self.conv, self.bypass_conv, self.bypass_bn) if module is not None for p in module.parameters()]
        self.conv = None  # type: ignore[assignment]
        self.bypass_conv, self.bypass_bn = None, None
        self.bypass_mode = "branch"
        return dropped

    def constant_output(self) -> torch.Tensor:
        """An input-free unit's output, 1 x C x 1 x 1 (BN's bias, masked where a mask is set)."""
        bias = self.bn.bias if self.channel_mask is None else self.bn.bias * self.channel_mask
        return bias.view(1, -1, 1, 1)

    def _normalize(self, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return bn(x) if self.channel_mask is None else masked_batch_norm(bn, x, self.channel_mask)

    def reparam_weight(self) -> torch.Tensor:
        """The one kxk kernel of bypass mode "reparam": W_k + centre tap(s * W_1), s = bypass_bn.weight
        (a per-channel linear scale; the bypass BN normalises nothing in this mode)."""
        assert self.bypass_conv is not None and self.bypass_bn is not None
        pad = self.conv.kernel_size[0] // 2
        bypass = self.bypass_conv.weight * self.bypass_bn.weight.view(-1, 1, 1, 1)
        return self.conv.weight + F.pad(bypass, (pad, pad, pad, pad))

    def _merged_conv(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return F.conv2d(x, self.reparam_weight(), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def set_bypass_mode(self, mode: str) -> None:
        """"reparam": `self.conv` computes with the merged kernel (its forward is replaced on this
        instance, so it is still called as a module: hooks that read conv outputs, such as the
        FLOPs cost's, see the one conv that runs); "branch": the plain conv again."""
        self.bypass_mode = mode if self.bypass_conv is not None else "branch"
        if self.conv is None:
            return
        if self.bypass_mode == "reparam":
            self.conv.forward = self._merged_conv     # type: ignore[method-assign]
        else:
            self.conv.__dict__.pop("forward", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return self.constant_output()
        y = self._normalize(self.bn, self.conv(x))
        if self.bypass_mode == "reparam":
            return y                                  # the bypass is inside self.conv's kernel
        if self.bypass_conv is not None and self.bypass_bn is not None:
            y = y + self._normalize(self.bypass_bn, self.bypass_conv(x))
        return y


@dataclass
class PrunableSite:
    """One prunable group of output channels (kept or removed together).

    name:      the key of the site's width in an architecture spec (a producer's module path,
               or a stage name for a residual group)
    producers: the ConvBNs whose output channels are kept or removed; more than one where a
               residual add sums their outputs (their channels are coupled one to one)
    followers: depthwise ConvBNs whose channels map one-to-one onto the producers'
    consumers: modules (ConvBN, nn.Conv2d, nn.Linear) reading these channels as input
    gates:     modules (nn.Conv2d, nn.Linear, no BatchNorm) whose output channels only multiply
               these channels one to one (squeeze-excitation's expanding layer): sliced with the
               site, never masked (a gate times a masked zero is zero)
    removal:   where the site may keep zero channels (a residual branch's inner conv in the CIFAR
               and torchvision basic-block ResNets, a MobileNetV2 block's expansion): removes the
               branch, given the optimizer to take its parameters out of; None where it may not
               (at least one channel is always kept)
    branch_index: where `removal` is set, the branch's position among its stage's residual branches
               (0: the first); `lapp-edge train --keep-blocks N` never removes the first N of a stage
    """

    name: str
    producers: list[ConvBN]
    followers: list[ConvBN] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)
    gates: list[nn.Module] = field(default_factory=list)
    removal: Callable[[torch.optim.Optimizer | None], None] | None = None
    branch_index: int = 0

    def __post_init__(self) -> None:
        if not self.producers:
            raise ValueError(f"site {self.name} has no producer")
        widths = {unit.out_channels for unit in self.producers}
        if len(widths) != 1:
            raise ValueError(f"site {self.name}: coupled producers have different widths {sorted(widths)}")

    @property
    def producer(self) -> ConvBN:
        """The first producer (the site's only one where nothing is coupled)."""
        return self.producers[0]

    @property
    def units(self) -> list[ConvBN]:
        """Every unit whose output channels this site's mask and slicing touch."""
        return [*self.producers, *self.followers]

    @property
    def channels(self) -> int:
        return self.producers[0].out_channels
