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

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
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
        drop_bypass(unit)
    return model


@torch.no_grad()
def merge_bypass(model: nn.Module, images: Iterable[torch.Tensor],
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 average: Callable[[list[torch.Tensor]], None] | None = None) -> list[ConvBN]:
    """In place: every bypass of `model` is merged into its unit's kxk conv, so the unit trains on
    as one conv + BN (`lapp-edge train --merge-bypass-at-freeze`). Returns the mode "branch" units
    merged (their conv weight and BN hold new values in the same Parameter objects).

    Mode "reparam" units are baked (`bake`: exact in training too; the conv weight becomes a new
    Parameter, the BN is untouched). Mode "branch" units, y = BN(conv_k(x)) + BN_b(conv_1(x)),
    become y = BN'(conv(x; W')): W' is the eval-mode fold of both branches (`models.fuse.fuse_convbn`:
    BN folded into each, 1x1 added to the centre tap), and BN' is set so that it is exactly the
    identity plus the fused bias b' in eval mode,
        running_mean = m, running_var = v, weight = sqrt(v + eps), bias = m + b',
    with m and v the per-channel mean and (biased) variance of conv(x; W') over `images` (batches of
    inputs, N x C x H x W, run through `forward`, the model's own call by default, in eval mode;
    computed in float32 outside autocast and summed in float64). `average`, where given, averages
    the summed moments in place across processes first (distributed: each saw its own batches).
    So the merged network computes what the two-branch network computes in eval mode (max abs
    difference ~1e-5 in float32), and in training mode its batch statistics start where the
    running ones are. What is lost is the over-parameterisation of the second branch (RepVGG's
    training benefit) for the rest of training: docs/RESULTS.md has its measured cost.

    Raises ValueError where a unit still carries a channel mask (merge after the masks are gone)
    or no image reached a unit. The caller rebuilds its optimizer: tensors changed, the bypass
    parameters are gone."""
    from lapp_edge.models.fuse import fuse_convbn

    if any(unit.channel_mask is not None for unit in bypass_units(model)):
        raise ValueError("merge_bypass: a unit still carries a channel mask; merge after freeze removed the masks")
    bake(model)
    units = bypass_units(model)
    if not units:
        return []
    fused = {unit: fuse_convbn(unit) for unit in units}
    moments: dict[ConvBN, torch.Tensor] = {}      # per unit: [sum of z, sum of z^2] per channel, and the count, float64

    def record(unit: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(unit, ConvBN)
        conv = fused[unit]
        with torch.autocast(inputs[0].device.type, enabled=False):
            z = F.conv2d(inputs[0].float(), conv.weight.float(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
        dims = (0, 2, 3)
        count = torch.full((z.shape[1],), float(z.numel() // z.shape[1]), dtype=torch.float64, device=z.device)
        batch = torch.stack([z.sum(dim=dims, dtype=torch.float64), z.square().sum(dim=dims, dtype=torch.float64), count])
        moments[unit] = moments[unit] + batch if unit in moments else batch

    was_training = model.training
    model.eval()
    hooks = [unit.register_forward_pre_hook(record) for unit in units]
    try:
        for batch in images:
            (forward or model)(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if len(moments) != len(units):
        raise ValueError("merge_bypass: no image reached every bypass unit (give at least one batch)")
    if average is not None:
        average([moments[unit] for unit in units])
    for unit in units:
        total, squares, count = moments[unit]
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0.0)
        conv, bn = fused[unit], unit.bn
        assert bn.running_mean is not None and bn.running_var is not None
        unit.conv.weight.copy_(conv.weight)
        if unit.conv.bias is not None:
            unit.conv.bias.zero_()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((bn.running_var + bn.eps).sqrt())     # from the stored variance: eval mode stays exact
        bn.bias.copy_(bn.running_mean + conv.bias)
    drop_bypass(model)
    return units


def drop_bypass(model: nn.Module) -> None:
    """In place: every unit of `model` (or `model` itself, a ConvBN) loses its bypass, no values carried
    over: what `bake` and `merge_bypass` end with, and the layout of a network whose bypasses were
    merged, for loading its weights (a resumed run after a merge)."""
    for unit in bypass_units(model):
        unit.set_bypass_mode("branch")
        unit.bypass_conv = None
        unit.bypass_bn = None
