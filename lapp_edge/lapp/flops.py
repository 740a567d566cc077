"""FLOPs of the deployed network as a function of each prunable site's kept channels.

Counts multiply-accumulates (MACs) of every conv and linear layer of the *deployed*
network: bypass branches are excluded because export folds them into the main kernel,
BatchNorm is folded too, and element-wise ops (ReLU, adds, pooling) are not counted.
This matches `torch.utils.flop_counter.FlopCounterMode` on the fused model, which
reports FLOPs = 2 x MACs; the tests cross-check the two.

A conv costs k_h * k_w * (c_in / groups) * c_out * H_out * W_out. Each term's c_in and
c_out are either fixed or the kept count of a site, so the total is a sum of products
that is differentiable in soft kept counts and can be evaluated for many candidate width
vectors at once (numpy or torch, any leading batch shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite


@dataclass(frozen=True)
class CostTerm:
    coefficient: float           # k_h * k_w * H_out * W_out (1 for a linear layer)
    out_site: int | None         # index of the site giving c_out, or None if fixed
    out_fixed: int
    in_site: int | None          # index of the site giving c_in, or None if fixed
    in_fixed: int
    depthwise: bool = False      # cost is coefficient * c (c_in == c_out == groups)


class FlopsCost:
    """MACs of the deployed network given kept counts per site (a vector over sites): the
    FLOPs implementation of `lapp_edge.lapp.cost.CostModel` (FLOPs = 2 x MACs; ratios are equal)."""

    name = "flops"
    unit = "MACs"

    def __init__(self, terms: list[CostTerm], site_channels: list[int]) -> None:
        self.terms = terms
        self.site_channels = site_channels
        self.dense_macs = float(self.macs(torch.tensor(site_channels, dtype=torch.float64)))

    @property
    def dense_cost(self) -> float:
        return self.dense_macs

    def cost(self, counts: Any) -> Any:
        return self.macs(counts)

    def macs(self, counts: Any) -> Any:
        """counts[..., s] is the kept count of site s; returns MACs with the leading shape."""
        total: Any = 0.0
        for term in self.terms:
            c_out = counts[..., term.out_site] if term.out_site is not None else term.out_fixed
            if term.depthwise:
                total = total + term.coefficient * c_out
                continue
            c_in = counts[..., term.in_site] if term.in_site is not None else term.in_fixed
            total = total + term.coefficient * c_out * c_in
        return total

    def ratio(self, counts: Any) -> Any:
        """MACs(counts) / dense MACs, for torch (differentiable) or numpy counts."""
        return self.macs(counts) / self.dense_macs


def _deployed_layers(model: nn.Module) -> list[nn.Module]:
    bypass_convs = {id(m.bypass_conv) for m in model.modules() if isinstance(m, ConvBN) and m.bypass_conv is not None}
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in bypass_convs]


def build_flops_cost(model: nn.Module, sites: list[PrunableSite], input_shape: tuple[int, int, int]) -> FlopsCost:
    """The FLOPs cost model of `model`: one forward pass at `input_shape` (C, H, W) reads every
    layer's output size; each conv/linear becomes a term whose c_in / c_out are fixed or a site's count."""
    out_site_of: dict[int, int] = {}
    in_site_of: dict[int, int] = {}
    for index, site in enumerate(sites):
        for unit in site.units:
            out_site_of[id(unit.conv)] = index
        for gate in site.gates:
            out_site_of[id(gate)] = index
        for consumer in site.consumers:
            in_site_of[id(consumer.conv if isinstance(consumer, ConvBN) else consumer)] = index

    layers = _deployed_layers(model)
    spatial: dict[int, int] = {}
    handles = [
        layer.register_forward_hook(lambda m, i, o: spatial.__setitem__(id(m), o[0, 0].numel() if o.dim() == 4 else 1))
        for layer in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model(torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    terms = []
    for layer in layers:
        if id(layer) not in spatial:
            continue  # not on the forward path
        if isinstance(layer, nn.Linear):
            terms.append(CostTerm(1.0, None, layer.out_features, in_site_of.get(id(layer)), layer.in_features))
            continue
        kernel = layer.kernel_size[0] * layer.kernel_size[1]
        coefficient = float(kernel * spatial[id(layer)])
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
        if layer.groups > 1 and not depthwise:
            coefficient /= layer.groups
        terms.append(CostTerm(
            coefficient, out_site_of.get(id(layer)), layer.out_channels,
            in_site_of.get(id(layer)), layer.in_channels, depthwise,
        ))
    return FlopsCost(terms, [site.channels for site in sites])


def count_deployed_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """MACs of a (slim or dense) model as deployed, with no sites (all widths fixed)."""
    return build_flops_cost(model, [], input_shape).dense_macs


def count_deployed_params(model: nn.Module) -> int:
    """Parameters of the deployed network: BN and bypass folded into conv weight + bias."""
    from lapp_edge.models.fuse import fuse_model

    return sum(p.numel() for p in fuse_model(model).parameters())


@dataclass(frozen=True)
class DeployedFigures:
    """Cost figures of a deployed (fused) model at batch 1."""

    macs: float                  # multiply-accumulates of convs and linear layers
    params: float                # parameters (BN and bypass folded)
    activations: float           # output elements of every conv / linear layer

    def to_dict(self) -> dict[str, float]:
        return {"macs": self.macs, "params": self.params, "activations": self.activations}


def deployed_figures(model: nn.Module, input_shape: tuple[int, int, int]) -> DeployedFigures:
    """MACs, parameters and conv/linear output elements of `model` as deployed (fused), at batch 1."""
    from lapp_edge.models.fuse import fuse_model

    fused = fuse_model(model).cpu()
    layers = [m for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    elements: list[int] = []
    handles = [layer.register_forward_hook(lambda m, i, o: elements.append(o[0].numel())) for layer in layers]
    try:
        with torch.no_grad():
            fused(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in fused.parameters())
    return DeployedFigures(float(count_deployed_macs(fused, input_shape)), float(params), float(sum(elements)))
