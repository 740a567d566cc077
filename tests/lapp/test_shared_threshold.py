"""The shared-threshold ablation (--shared-threshold): one learnable threshold broadcast to every site."""

from __future__ import annotations

import pytest
import torch

from lapp_edge.errors import UserError
from lapp_edge.lapp.controller import LappConfig, LappController
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.models import build_model, prunable_sites
from lapp_edge.training.config import TrainConfig, refuse_ignored_options, validate_config


def shared_controller(target: float = 0.5) -> tuple[torch.nn.Module, LappController]:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, bypass=True, coupled=True)
    for module in model.modules():      # per-channel scores that differ, as after some training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = torch.rand_like(module.weight) + 0.05
    sites = prunable_sites(model)
    cost = build_flops_cost(model, sites, (1, 28, 28))
    return model, LappController(sites, cost, LappConfig(target=target, shared_threshold=True))


def test_one_parameter_for_every_site_and_its_gradient_comes_from_all() -> None:
    model, controller = shared_controller()
    assert [p.numel() for p in controller.parameters()] == [1]
    assert controller.site_thresholds().shape == (len(controller.sites),)
    controller.update_masks()
    with torch.no_grad():   # a threshold inside every layer's score range, so the surrogate is not flat
        controller.thresholds.fill_(0.0)
    for target_now, sign in ((0.02, -1.0), (0.98, 1.0)):
        controller.thresholds.grad = None
        controller.update_masks()
        assert 0.02 < float(controller.cost_ratio().detach()) < 0.98
        controller.penalty(target_now=target_now).backward()
        assert controller.thresholds.grad is not None and controller.thresholds.grad.shape == (1,)
        # cost above the target: raising the one threshold lowers every layer's count, so the gradient is negative
        assert sign * float(controller.thresholds.grad) > 0


def test_shared_threshold_cuts_every_layer_at_the_same_score() -> None:
    _, controller = shared_controller()
    controller.update_masks()
    with torch.no_grad():
        controller.thresholds.fill_(0.1)
    counts = controller.hard_counts()
    expected = [int((s > 0.1).sum()) for s in controller.scores()]
    assert counts == expected
    controller.clamp_thresholds()           # capped below the lowest per-layer cap: no layer drops below its minimum
    assert all(c >= min(8, site.channels) for c, site in zip(controller.hard_counts(), controller.sites))
    plan = controller.plan_freeze()
    assert abs(plan.cost_ratio - 0.5) <= 0.01


def test_the_flags_reach_the_controller_and_are_lapp_only(tmp_path) -> None:
    config = TrainConfig(out=str(tmp_path / "r"), shared_threshold=True, anneal_fraction=0.0)
    lapp = config.lapp_config()
    assert lapp.shared_threshold and lapp.anneal_fraction == 0.0
    with pytest.raises(UserError, match="--anneal-fraction"):
        validate_config(TrainConfig(out=str(tmp_path / "r"), anneal_fraction=1.5))
    with pytest.raises(UserError, match="--shared-threshold"):
        refuse_ignored_options({"dense": True, "shared_threshold": True})
