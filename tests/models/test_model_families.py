"""Every registered model family gets the same checks (a new family is one file in
lapp_edge/models/ plus its registry line; it is tested here without a new test):

- prunable sites are found, each with a producer and at least one consumer, with residual-coupled
  groups as sites (coupled=True, the default for training) and without them;
- a masked network equals the physically slimmed one (same logits, <= 1e-5);
- BN and bypass folding is exact in eval mode;
- the FLOPs cost model equals torch's FlopCounterMode, dense and slim;
- the exported ONNX graph has one Conv per conv of the fused model and no BatchNormalization.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lapp_edge.export.onnx import check_graph, export_onnx
from lapp_edge.lapp.flops import build_flops_cost, count_deployed_macs
from lapp_edge.models import MODEL_BUILDERS, ConvBN, build_model, prunable_sites
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models.slicing import slim_site
from tests.models.test_fuse import randomize_batchnorm

# (channels, size): CIFAR-style families at 1x28x28 (Fashion-MNIST), torchvision ones at a small 3x64x64.
INPUTS = {name: ((3, 64) if name in ("resnet18", "resnet34", "resnet50") else (1, 28)) for name in MODEL_BUILDERS}
# ONNX export of the deepest families takes tens of seconds on 2 cores: they run in `make test-slow`.
SLOW_EXPORT = {"resnet110", "resnet56", "resnet50", "resnet34", "vgg16_bn"}


def flop_counter_macs(model: nn.Module, shape: tuple[int, int, int]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fuse_model(model)(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


# The deepest member of a family runs the same code as a shallower one that stays in `make test`
# (resnet56/110 as resnet20/32, resnet34 as resnet18, resnet50's inner-only sites as its groups):
# masked == slim, FLOPs and fusion on them run in `make test-slow`.
SLOW_CHECKS = {("resnet56", True), ("resnet56", False), ("resnet110", True), ("resnet110", False),
               ("resnet34", True), ("resnet34", False), ("resnet50", False)}
COUPLED = [pytest.param(name, coupled, marks=[pytest.mark.slow] if (name, coupled) in SLOW_CHECKS else [],
                        id=f"{name}-{'groups' if coupled else 'inner'}")
           for name in MODEL_BUILDERS for coupled in (True, False)]
SLOW_FUSION = {"resnet56", "resnet110", "resnet34"}


def family(name: str, bypass: bool = True, coupled: bool = True) -> tuple[nn.Module, tuple[int, int, int]]:
    channels, size = INPUTS[name]
    torch.manual_seed(0)
    model = build_model(name, channels, 10, bypass=bypass, coupled=coupled).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model, (channels, size, size)


def mask_sites(sites: list, keeps: list[torch.Tensor]) -> None:
    """Set each site's mask on its units: 1 on the `keeps` channels, 0 elsewhere."""
    for site, keep in zip(sites, keeps):
        mask = torch.zeros(site.channels)
        mask[keep] = 1.0
        for unit in site.units:
            unit.channel_mask = mask


def random_keep(sites: list, generator: torch.Generator) -> list[torch.Tensor]:
    keeps = []
    for site in sites:
        width = int(torch.randint(1, site.channels + 1, (1,), generator=generator))
        keeps.append(torch.randperm(site.channels, generator=generator)[:width].sort().values)
    return keeps


@pytest.mark.parametrize(("name", "coupled"), [(p.values[0], p.values[1]) for p in COUPLED], ids=[p.id for p in COUPLED])
def test_sites_are_found(name: str, coupled: bool) -> None:
    model, _ = family(name, coupled=coupled)
    sites = prunable_sites(model)
    assert sites, f"{name} has no prunable site"
    assert len({site.name for site in sites}) == len(sites)
    units = [id(unit) for site in sites for unit in site.units]
    assert len(units) == len(set(units)), "a unit belongs to two sites"
    for site in sites:
        assert all(isinstance(p, ConvBN) for p in site.producers) and site.consumers and site.channels > 1
    groups = [site for site in sites if len(site.producers) > 1]
    if not coupled or name == "vgg16_bn":
        assert not groups                       # VGG has no residual add; inner-only layout has no group
    else:
        assert groups and all(site.name.endswith((".residual", ".projection")) for site in groups)


@pytest.mark.parametrize(("name", "coupled"), COUPLED)
def test_masked_equals_slim_and_flops_match_the_flop_counter(name: str, coupled: bool) -> None:
    model, shape = family(name, coupled=coupled)
    sites = prunable_sites(model)
    cost = build_flops_cost(model, sites, shape)
    assert cost.dense_macs == flop_counter_macs(model, shape)
    keeps = random_keep(sites, torch.Generator().manual_seed(2))
    mask_sites(sites, keeps)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(x)
    slim = copy.deepcopy(model)
    slim_sites = prunable_sites(slim)
    for site, keep in zip(slim_sites, keeps):
        slim_site(site, keep)
        for unit in site.units:
            unit.channel_mask = None
    with torch.no_grad():
        result = slim(x)
    scale = float(masked.abs().max().clamp(min=1.0))
    assert float((masked - result).abs().max()) / scale <= 1e-5
    widths = torch.tensor([float(len(k)) for k in keeps], dtype=torch.float64)
    assert float(cost.macs(widths)) == count_deployed_macs(slim, shape) == flop_counter_macs(slim, shape)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FUSION else n for n in MODEL_BUILDERS])
def test_fusion_is_exact(name: str) -> None:
    model, shape = family(name)
    fused = fuse_model(model)
    assert not any(isinstance(m, (ConvBN, nn.BatchNorm2d)) for m in fused.modules())
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference, result = model(x), fused(x)
    scale = float(reference.abs().max().clamp(min=1.0))
    assert float((reference - result).abs().max()) / scale <= 1e-5


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORT else n for n in MODEL_BUILDERS])
def test_onnx_has_one_conv_per_fused_conv(name: str) -> None:
    model, shape = family(name, bypass=True)
    fused = fuse_model(model)
    graph = check_graph(export_onnx(fused, shape), fused)
    assert graph.problem() is None, graph.problem()
    assert graph.conv_nodes == graph.expected_convs > 0
