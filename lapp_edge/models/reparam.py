"""Training-time re-parameterisation of the 1x1 bypass (`lapp-edge train --bypass-mode reparam`).

Bypass mode "branch" (the default) trains RepVGG's form: two convolutions and two BatchNorms
per unit and step,

    y = BN(conv_kxk(x; W_k)) + BN_b(conv_1x1(x; W_1))

which costs about a quarter of a pruning epoch on a CPU (docs/RESULTS.md). The branches cannot
be merged exactly while training: each BN normalises its branch with that branch's own batch
statistics, a non-linear function of the batch. Bypass mode "reparam" follows OREPA
(Hu et al., "Online Convolutional Re-parameterization", CVPR 2022): the branch BN is replaced by
a linear per-channel scale s (its "linear scaling layer") and the sum is normalised by one BN
after it, so the two branches become one kernel, computed from the weights at every step:

    y = BN(conv_kxk(x; W_k + centre(s * W_1)))

One convolution and one BN per step; gradients reach W_k, W_1 and s through the kernel sum
(the centre tap is over-parameterised, which is the point of the bypass). s lives in
`bypass_bn.weight` (initialised to 1, weight-decayed like a BN gamma, scored like one by the
default scorer); the bypass BN's bias and running statistics are unused (the bias is frozen,
so DDP and the optimizer see no unused parameter). This is a different function of the weights
than "branch" (one BN on the sum instead of one per branch), so it trains differently: see
docs/GPU.md for the measured effect on accuracy.

After training, `bake` turns each unit into a plain ConvBN without a bypass (W_k := merged
kernel): exact, since nothing non-linear sits between the branches. The run's slim model is
saved baked, so export, verification and the deploy side see an ordinary model.
"""

from __future__ import annotations

import torch
from torch import nn

from lapp_edge.models.units import ConvBN

BYPASS_MODES = ("branch", "reparam")


def bypass_units(model: nn.Module) -> list[ConvBN]:
    return [m for m in model.modules() if isinstance(m, ConvBN) and m.bypass_conv is not None and m.bypass_bn is not None]


def use_bypass_mode(model: nn.Module, mode: str) -> None:
    """Train every bypass of `model` in `mode` ("branch" or "reparam"); call before the optimizer
    and DDP are built (it changes which parameters take gradients)."""
    if mode not in BYPASS_MODES:
        raise ValueError(f"unknown bypass mode {mode!r}; choose one of: {', '.join(BYPASS_MODES)}")
    for unit in bypass_units(model):
        unit.set_bypass_mode(mode)
        assert unit.bypass_bn is not None
        unit.bypass_bn.bias.requires_grad_(mode == "branch")


@torch.no_grad()
def bake(model: nn.Module) -> nn.Module:
    """In place: every unit in mode "reparam" becomes a plain ConvBN (no bypass) computing the
    same function. Returns `model`."""
    for unit in bypass_units(model):
        if unit.bypass_mode != "reparam":
            continue
        merged = unit.reparam_weight().detach().clone()
        unit.conv.weight = nn.Parameter(merged, requires_grad=unit.conv.weight.requires_grad)
        unit.set_bypass_mode("branch")
        unit.bypass_conv = None
        unit.bypass_bn = None
    return model
