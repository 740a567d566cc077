"""LAPP mechanics: threshold gradients, masked == slim, momentum slicing, width search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lapp_edge.data.torch_data import iterate_batches
from lapp_edge.lapp.controller import LappConfig, LappController
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.lapp.schedule import annealed_target
from lapp_edge.lapp.widths import allowed_widths, choose_widths, target_widths
from lapp_edge.models import ConvBN, build_model, prunable_sites


def make_controller(name: str = "resnet20", target: float = 0.4, multiple: int = 8, channels: int = 1):
    model = build_model(name, channels, 10, bypass=True)
    sites = prunable_sites(model)
    flops = build_flops_cost(model, sites, (channels, 28, 28))
    config = LappConfig(target=target, channel_multiple=multiple, min_channels=multiple)
    return model, LappController(sites, flops, config)


def test_thresholds_get_gradients_from_task_loss_and_from_penalty(fmnist) -> None:
    model, controller = make_controller()
    images, labels = next(iterate_batches(fmnist.test, fmnist.info, 64, torch.device("cpu")))
    with torch.no_grad():  # put thresholds inside the score range so the sigmoid is not flat
        controller.update_masks()
        controller.thresholds.copy_(torch.stack([s.median() for s in controller.last_scores]))
    controller.update_masks()
    F.cross_entropy(model(images), labels).backward()
    task_grad = controller.thresholds.grad.clone()
    assert bool((task_grad != 0).all()), task_grad

    controller.thresholds.grad = None
    controller.update_masks()
    controller.penalty(target_now=0.3).backward()
    penalty_grad = controller.thresholds.grad
    # FLOPs above target: raising any threshold lowers FLOPs, so every gradient is negative
    assert bool((penalty_grad < 0).all()), penalty_grad


def test_initial_thresholds_prune_nothing() -> None:
    model, controller = make_controller()
    kept = controller.update_masks()
    assert kept.tolist() == [float(site.channels) for site in controller.sites]
    assert float(controller.cost_ratio().detach()) == 1.0


def test_annealed_target_is_cubic_then_held() -> None:
    assert annealed_target(0, 100, 0.4) == 1.0
    assert annealed_target(75, 100, 0.4) == pytest.approx(0.4)
    assert annealed_target(99, 100, 0.4) == pytest.approx(0.4)
    midway = annealed_target(37, 100, 0.4)
    assert 0.4 < midway < 1.0 - 0.6 * 37 / 75  # a cubic drops faster than linear early on


def train_a_few_steps(model: nn.Module, controller: LappController, fmnist, steps: int = 12) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    threshold_optimizer = torch.optim.Adam([controller.thresholds], lr=0.3)
    generator = torch.Generator().manual_seed(0)
    batches = iterate_batches(fmnist.train, fmnist.info, 32, torch.device("cpu"), generator, train=True)
    model.train()
    for step, (images, labels) in zip(range(steps), batches):
        controller.update_masks()
        loss = F.cross_entropy(model(images), labels) + controller.penalty(annealed_target(step, steps, 0.4, 0.5))
        optimizer.zero_grad()
        threshold_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        threshold_optimizer.step()
        controller.clamp_thresholds()
    return optimizer


@pytest.mark.parametrize("multiple", [8, 1])
def test_slim_model_equals_masked_model_on_real_images(fmnist, multiple: int) -> None:
    model, controller = make_controller(multiple=multiple)
    optimizer = train_a_few_steps(model, controller, fmnist)
    plan = controller.plan_freeze()
    assert any(w < s.channels for w, s in zip(plan.widths.values(), controller.sites))
    controller.apply_final_masks(plan, optimizer)
    images, _ = next(iterate_batches(fmnist.test, fmnist.info, 256, torch.device("cpu")))
    model.eval()
    with torch.no_grad():
        masked_logits = model(images)
    controller.slim(plan, optimizer)
    with torch.no_grad():
        slim_logits = model(images)
    assert float((masked_logits - slim_logits).abs().max()) <= 1e-5

    # a plain module: no masks, hooks or gates, no all-zero channels, the planned widths
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert getattr(module, "channel_mask", None) is None
    assert not any("threshold" in name or "mask" in name for name, _ in model.named_parameters())
    for site in prunable_sites(model):
        assert site.channels == plan.widths[site.name]
        norms = site.producer.conv.weight.detach().flatten(1).norm(dim=1)
        assert bool((norms > 0).all())
        assert site.channels % multiple == 0 or site.channels == site.producer.bn.num_features


def test_slimming_slices_momentum_with_the_weights(fmnist) -> None:
    model, controller = make_controller()
    optimizer = train_a_few_steps(model, controller, fmnist, steps=4)
    site = controller.sites[4]
    old_weight = site.producer.conv.weight
    old_momentum = optimizer.state[old_weight]["momentum_buffer"].clone()
    plan = controller.plan_freeze()
    controller.slim(plan, optimizer)
    new_weight = site.producer.conv.weight
    keep = torch.tensor(plan.keep_indices[site.name])
    assert torch.equal(optimizer.state[new_weight]["momentum_buffer"], old_momentum[keep])
    assert old_weight not in optimizer.state
    assert any(p is new_weight for group in optimizer.param_groups for p in group["params"])


def test_readded_channels_enter_as_exact_no_ops() -> None:
    model, controller = make_controller(multiple=8)
    with torch.no_grad():
        controller.update_masks()
        # prune all but 3 channels of the first layer: rounding up to 8 brings 5 back
        first = controller.last_scores[0]
        controller.thresholds[0] = first.topk(3).values[-1] - 1e-4
    plan = controller.plan_freeze()
    name = controller.sites[0].name
    assert plan.widths[name] >= 8 and plan.readded[name] >= 5
    controller.apply_final_masks(plan)
    consumer = controller.sites[0].consumers[0]
    scores = controller.scores()[0]
    returning = [i for i in plan.keep_indices[name] if not scores[i] > controller.thresholds[0]]
    assert returning and float(consumer.conv.weight[:, returning].abs().sum()) == 0.0


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("multiple", [8, 1])
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn"])
def test_width_search_lands_on_target(name: str, target: float, multiple: int) -> None:
    model = build_model(name, 1, 10)
    sites = prunable_sites(model)
    flops = build_flops_cost(model, sites, (1, 28, 28))
    rng = np.random.default_rng(int(target * 10) + multiple)
    unrounded = np.array([rng.uniform(0.3, 1.0) * s.channels for s in sites]) * target ** 0.5
    widths = choose_widths(unrounded, flops, target, multiple, min_width=multiple)
    assert abs(float(flops.ratio(widths.astype(float))) - target) <= 0.01
    for width, site in zip(widths, sites):
        assert width % multiple == 0 or width == site.channels
        assert multiple <= width <= site.channels


def resnet20_cost():  # noqa: ANN201
    model = build_model("resnet20", 1, 10)
    return build_flops_cost(model, prunable_sites(model), (1, 28, 28))


@pytest.mark.parametrize("multiple", [64, 100])
def test_a_multiple_at_or_above_every_width_keeps_full_widths(multiple: int) -> None:
    # every site has one allowed width (its full width): the search has no move to make
    cost = resnet20_cost()
    widths = choose_widths(np.array([3.0] * len(cost.site_channels)), cost, 0.5, multiple, multiple)
    assert widths.tolist() == list(cost.site_channels)
    assert target_widths(cost, 1.0, multiple, multiple, 0.004)[1] == 1.0
    assert target_widths(cost, 0.5, multiple, multiple, 0.004)[1] == 1.0


def test_target_widths_tell_a_reachable_target_from_an_unreachable_one() -> None:
    cost = resnet20_cost()
    # multiples of 32: ResNet-20 keeps 0.898 or 0.942 of its FLOPs, nothing in between
    assert abs(target_widths(cost, 0.90, 32, 32, 0.004)[1] - 0.90) <= 0.01
    assert abs(target_widths(cost, 0.92, 32, 32, 0.004)[1] - 0.92) > 0.01


def test_freeze_search_meets_the_target_where_the_learned_start_gets_stuck() -> None:
    # from these learned widths the plain descent ends at 0.7525 (outside +-0.01 of 0.742); the
    # fallback from the pre-training search's widths lands on target
    cost = resnet20_cost()
    learned, target = np.array([6.0, 10.0, 9.0, 30.0, 13.0, 7.0, 57.0, 58.0, 6.0]), 0.742
    assert abs(target_widths(cost, target, 16, 16, 0.004)[1] - target) <= 0.01
    widths = choose_widths(learned, cost, target, 16, 16)
    assert abs(float(cost.ratio(widths.astype(float))) - target) <= 0.01


@pytest.mark.parametrize("multiple", [8, 16, 32])
def test_freeze_meets_every_target_the_check_before_training_accepts(multiple: int) -> None:
    cost = resnet20_cost()
    rng = np.random.default_rng(multiple)
    for _ in range(40):
        target = float(rng.uniform(0.2, 1.0))
        if abs(target_widths(cost, target, multiple, multiple, 0.004)[1] - target) > 0.01:
            continue
        learned = np.array([rng.uniform(0.05, 1.0) * c for c in cost.site_channels])
        widths = choose_widths(learned, cost, target, multiple, multiple)
        assert abs(float(cost.ratio(widths.astype(float))) - target) <= 0.01, (target, learned)


def test_allowed_widths_include_full_width() -> None:
    assert allowed_widths(20, 8, 8).tolist() == [8, 16, 20]
    assert allowed_widths(16, 8, 8).tolist() == [8, 16]
    assert allowed_widths(3, 1, 1).tolist() == [1, 2, 3]


def test_every_prunable_site_is_a_convbn() -> None:
    for name in ("resnet20", "vgg16_bn", "mobilenetv2", "resnet18", "resnet50"):
        model = build_model(name, 3, 10, bypass=True)
        sites = prunable_sites(model)
        assert sites and all(isinstance(s.producer, ConvBN) and s.producer.bypass_conv is not None for s in sites)
