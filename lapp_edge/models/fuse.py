"""Fold BatchNorm into convs and each bypass branch into its main kernel.

Uses torch's own `fuse_conv_bn_weights` for each branch; the bypass 1x1 kernel is then
added to the centre tap of the kxk kernel (same stride, 'same' padding, so the centre tap
reads exactly the pixel the 1x1 conv reads). The result is a plain conv with bias,
equal to the ConvBN in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lapp_edge.models.units import ConvBN, batch_norm_of_zeros


class ChannelConstant(nn.Module):
    """The deployed form of an input-free ConvBN (a removed residual branch, `ConvBN.drop_inputs`):
    its per-channel constant, 1 x C x 1 x 1, whatever the input (exported as an initializer the
    residual add broadcasts)."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values


def fuse_convbn(unit: ConvBN) -> nn.Module:
    """The unit as one conv with bias (eval mode), or a `ChannelConstant` for an input-free unit."""
    conv, bn = unit.conv, unit.bn
    if conv is None:
        return ChannelConstant(batch_norm_of_zeros(bn))
    reparam = unit.bypass_mode == "reparam" and unit.bypass_conv is not None
    # bypass mode "reparam" (models/reparam.py): the main BN normalises the merged kernel's output
    kernel = unit.reparam_weight() if reparam else conv.weight
    weight, bias = fuse_conv_bn_weights(
        kernel, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    weight, bias = weight.detach().clone(), bias.detach().clone()
    if unit.bypass_conv is not None and unit.bypass_bn is not None and not reparam:
        bypass_bn = unit.bypass_bn
        bypass_weight, bypass_bias = fuse_conv_bn_weights(
            unit.bypass_conv.weight, None, bypass_bn.running_mean, bypass_bn.running_var,
            bypass_bn.eps, bypass_bn.weight, bypass_bn.bias,
        )
        centre = conv.kernel_size[0] // 2
        weight[:, :, centre, centre] += bypass_weight.detach()[:, :, 0, 0]
        bias += bypass_bias.detach()
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True,
    ).to(weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def fuse_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every ConvBN replaced by one fused conv."""
    fused_model = copy.deepcopy(model).eval()
    if isinstance(fused_model, ConvBN):
        return fuse_convbn(fused_model).eval()
    units = [(name, m) for name, m in fused_model.named_modules() if isinstance(m, ConvBN)]
    for name, unit in units:
        parent_name, _, child_name = name.rpartition(".")
        parent = fused_model.get_submodule(parent_name) if parent_name else fused_model
        setattr(parent, child_name, fuse_convbn(unit))
    return fused_model
