"""Physical slimming: remove channels from a model in place, keeping optimizer state.

Every tensor change goes through `_select`, which also slices the optimizer's per-parameter
state (SGD momentum, Adam moments) so a mid-run slim keeps what the optimizer learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lapp_edge.models.units import ConvBN, PrunableSite


def _select(
    module: nn.Module, name: str, index: torch.Tensor, dim: int, optimizer: torch.optim.Optimizer | None
) -> None:
    tensor = getattr(module, name)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if not isinstance(tensor, nn.Parameter):
        setattr(module, name, sliced)  # a buffer (BN running statistics)
        return
    new_param = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
    if optimizer is not None:
        state = optimizer.state.pop(tensor, None)
        if state is not None:
            optimizer.state[new_param] = {
                key: value.index_select(dim, index.to(value.device)).clone()
                if torch.is_tensor(value) and value.shape == tensor.shape else value
                for key, value in state.items()
            }
        for group in optimizer.param_groups:
            group["params"] = [new_param if p is tensor else p for p in group["params"]]
    setattr(module, name, new_param)


def _select_bn(bn: nn.BatchNorm2d | None, index: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    if bn is None:
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        _select(bn, name, index, 0, optimizer)
    bn.num_features = len(index)


def _select_conv_out(conv: nn.Conv2d | None, index: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    if conv is None:
        return
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    _select(conv, "weight", index, 0, optimizer)
    _select(conv, "bias", index, 0, optimizer)
    conv.out_channels = len(index)
    if depthwise:
        conv.in_channels = conv.groups = len(index)


def _select_conv_in(conv: nn.Conv2d | None, index: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    if conv is None:
        return
    if conv.groups != 1:
        raise ValueError("a grouped conv cannot consume a pruned site; make it a follower")
    _select(conv, "weight", index, 1, optimizer)
    conv.in_channels = len(index)


def select_output_channels(unit: ConvBN, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep only `index` output channels of a ConvBN (both branches). Depthwise units keep
    the same channels on their input side too."""
    for conv, bn in ((unit.conv, unit.bn), (unit.bypass_conv, unit.bypass_bn)):
        _select_conv_out(conv, index, optimizer)
        _select_bn(bn, index, optimizer)


def select_input_channels(module: nn.Module, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep only `index` input channels of a consumer (ConvBN, Conv2d or Linear)."""
    if isinstance(module, ConvBN):
        _select_conv_in(module.conv, index, optimizer)
        _select_conv_in(module.bypass_conv, index, optimizer)
    elif isinstance(module, nn.Conv2d):
        _select_conv_in(module, index, optimizer)
    elif isinstance(module, nn.Linear):
        _select(module, "weight", index, 1, optimizer)
        module.in_features = len(index)
    else:
        raise TypeError(f"cannot slice the input channels of {type(module).__name__}")


def select_gate_outputs(module: nn.Module, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep only `index` output channels of a gate (a Conv2d or Linear without BatchNorm)."""
    if isinstance(module, nn.Conv2d):
        _select_conv_out(module, index, optimizer)
    elif isinstance(module, nn.Linear):
        _select(module, "weight", index, 0, optimizer)
        _select(module, "bias", index, 0, optimizer)
        module.out_features = len(index)
    else:
        raise TypeError(f"cannot slice the output channels of {type(module).__name__}")


def drop_from_optimizer(parameters: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> None:
    """Take parameters that left the model (a removed branch) out of the optimizer and its state."""
    if optimizer is None or not parameters:
        return
    gone = {id(p) for p in parameters}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for parameter in parameters:
        optimizer.state.pop(parameter, None)


def slim_site(site: PrunableSite, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Remove every channel of `site` not in `keep` (sorted indices), wherever it appears. An
    empty `keep` removes what the site feeds (`site.removal`); ValueError where it may not."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if len(keep) == 0:
        if site.removal is None:
            raise ValueError(f"site {site.name} must keep at least one channel")
        site.removal(optimizer)
        return
    for unit in site.units:
        select_output_channels(unit, keep, optimizer)
    for gate in site.gates:
        select_gate_outputs(gate, keep, optimizer)
    for consumer in site.consumers:
        select_input_channels(consumer, keep, optimizer)


def consumer_input_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weight tensors whose dim 1 reads a consumer's input channels."""
    if isinstance(module, ConvBN):
        return [w for w in (module.conv.weight, module.bypass_conv.weight if module.bypass_conv else None) if w is not None]
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return [module.weight]
    raise TypeError(f"cannot read the input weights of {type(module).__name__}")


def resize_to_widths(model: nn.Module, sites: Sequence[PrunableSite], widths: dict[str, int]) -> None:
    """Give a freshly built dense model the shapes of a slim one (weights are loaded after)."""
    for site in sites:
        if site.name in widths:
            slim_site(site, torch.arange(int(widths[site.name])))
