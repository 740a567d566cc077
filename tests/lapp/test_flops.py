"""The FLOPs cost model: differentiable in kept counts, and a CostModel (FlopCounterMode agreement
for every family, dense and slim: tests/models/test_model_families.py)."""

from __future__ import annotations

import numpy as np
import torch

from lapp_edge.lapp.cost import CostModel
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.models import build_model, prunable_sites


def test_macs_are_differentiable_in_kept_counts() -> None:
    model = build_model("vgg16_bn", 1, 10)
    sites = prunable_sites(model)
    flops = build_flops_cost(model, sites, (1, 28, 28))
    counts = torch.tensor([float(s.channels) for s in sites], requires_grad=True)
    flops.ratio(counts).backward()
    assert counts.grad is not None and bool((counts.grad > 0).all())


def test_flops_cost_is_a_cost_model_evaluated_in_bulk() -> None:
    model = build_model("resnet20", 1, 10)
    cost = build_flops_cost(model, prunable_sites(model), (1, 28, 28))
    assert isinstance(cost, CostModel) and cost.name == "flops" and cost.dense_cost == cost.dense_macs
    dense = np.array(cost.site_channels, dtype=np.float64)
    batch = np.stack([dense, dense / 2, np.full_like(dense, 8)])          # three candidate width vectors at once
    ratios = cost.ratio(batch)
    assert ratios.shape == (3,) and ratios[0] == 1.0 and 1.0 > ratios[1] > ratios[2] > 0
    assert float(cost.ratio(torch.tensor(dense / 2))) == ratios[1]
