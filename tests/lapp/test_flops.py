"""The FLOPs model against torch's own FlopCounterMode (FLOPs = 2 x MACs), dense and slim."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lapp_edge.models.fuse import fuse_model
from lapp_edge.lapp.flops import build_flops_cost, count_deployed_macs
from lapp_edge.models.slicing import slim_site
from lapp_edge.models import build_model, prunable_sites

CASES = [("resnet20", 1, 28), ("vgg16_bn", 1, 28), ("mobilenetv2", 3, 32), ("resnet18", 3, 64), ("resnet50", 3, 64)]


def flop_counter_macs(model: torch.nn.Module, shape: tuple[int, int, int]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fuse_model(model)(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_dense_macs_match_flop_counter(name: str, channels: int, size: int) -> None:
    model = build_model(name, channels, 10, bypass=True)
    flops = build_flops_cost(model, prunable_sites(model), (channels, size, size))
    assert flops.dense_macs == flop_counter_macs(model, (channels, size, size))


@pytest.mark.parametrize(("name", "channels", "size"), CASES[:3])
def test_slim_macs_match_flop_counter_for_random_widths(name: str, channels: int, size: int) -> None:
    shape = (channels, size, size)
    model = build_model(name, channels, 10, bypass=True)
    sites = prunable_sites(model)
    flops = build_flops_cost(model, sites, shape)
    generator = torch.Generator().manual_seed(3)
    widths = [int(torch.randint(1, s.channels + 1, (1,), generator=generator)) for s in sites]
    for site, width in zip(sites, widths):
        keep = torch.randperm(site.channels, generator=generator)[:width]
        slim_site(site, keep)
    predicted = flops.macs(torch.tensor(widths, dtype=torch.float64))
    assert float(predicted) == count_deployed_macs(model, shape) == flop_counter_macs(model, shape)
    assert float(predicted) < flops.dense_macs


def test_macs_are_differentiable_in_kept_counts() -> None:
    model = build_model("vgg16_bn", 1, 10)
    sites = prunable_sites(model)
    flops = build_flops_cost(model, sites, (1, 28, 28))
    counts = torch.tensor([float(s.channels) for s in sites], requires_grad=True)
    flops.ratio(counts).backward()
    assert counts.grad is not None and bool((counts.grad > 0).all())
