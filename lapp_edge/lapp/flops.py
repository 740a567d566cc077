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

from lapp_edge.costs.latency_table import layer_signature
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


@dataclass(frozen=True)
class DeployedLayer:
    """One conv or linear layer of the deployed network, with where its widths come from:
    `in_site` / `out_site` index the prunable site giving c_in / c_out (None: fixed at `in_fixed` /
    `out_fixed`). Shapes are per image: `in_hw` the input's spatial size, `out_elements` H_out * W_out."""

    kind: str                     # "conv" | "linear"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_elements: int
    in_site: int | None
    in_fixed: int
    out_site: int | None
    out_fixed: int

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_fixed == self.out_fixed

    @property
    def signature(self) -> str:
        """What the layer's latency depends on besides its widths (costs.latency_table.layer_signature)."""
        return layer_signature(self.kernel, self.stride, self.padding, self.depthwise, self.groups, self.in_hw)


def deployed_layers(model: nn.Module, sites: list[PrunableSite], input_shape: tuple[int, int, int]) -> list[DeployedLayer]:
    """Every conv and linear layer on the forward path of `model` as deployed (bypass convs are
    folded away), in module order, read by one forward pass at `input_shape` (C, H, W); each
    layer's c_in / c_out is tied to the site that prunes it, if any."""
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
    shapes: dict[int, tuple[tuple[int, int], int]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        in_hw = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else (1, 1)
        shapes[id(module)] = (in_hw, int(output[0, 0].numel()) if output.dim() == 4 else 1)

    handles = [layer.register_forward_hook(record) for layer in layers]
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

    result = []
    for layer in layers:
        if id(layer) not in shapes:
            continue  # not on the forward path
        in_hw, out_elements = shapes[id(layer)]
        if isinstance(layer, nn.Linear):
            result.append(DeployedLayer("linear", (1, 1), (1, 1), (0, 0), 1, (1, 1), 1,
                                        in_site_of.get(id(layer)), layer.in_features, None, layer.out_features))
            continue
        padding = layer.padding if isinstance(layer.padding, tuple) else (
            (layer.kernel_size[0] // 2, layer.kernel_size[1] // 2) if layer.padding == "same" else (0, 0))
        result.append(DeployedLayer(
            "conv", tuple(layer.kernel_size), tuple(layer.stride), tuple(padding), layer.groups, in_hw, out_elements,  # type: ignore[arg-type]
            in_site_of.get(id(layer)), layer.in_channels, out_site_of.get(id(layer)), layer.out_channels,
        ))
    return result


def build_flops_cost(model: nn.Module, sites: list[PrunableSite], input_shape: tuple[int, int, int]) -> FlopsCost:
    """The FLOPs cost model of `model`: one forward pass at `input_shape` (C, H, W) reads every
    layer's output size; each conv/linear becomes a term whose c_in / c_out are fixed or a site's count."""
    terms = []
    for layer in deployed_layers(model, sites, input_shape):
        if layer.kind == "linear":
            terms.append(CostTerm(1.0, None, layer.out_fixed, layer.in_site, layer.in_fixed))
            continue
        coefficient = float(layer.kernel[0] * layer.kernel[1] * layer.out_elements)
        if layer.groups > 1 and not layer.depthwise:
            coefficient /= layer.groups
        terms.append(CostTerm(coefficient, layer.out_site, layer.out_fixed, layer.in_site, layer.in_fixed, layer.depthwise))
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
