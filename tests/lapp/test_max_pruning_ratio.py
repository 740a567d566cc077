"""--max-pruning-ratio R: every prunable layer or coupled group keeps at least ceil((1 - R) * its channels),
rounded up to the channel multiple, in training (thresholds clamped), at freeze (the width search) and in
the reachability check before anything is written. Found needed where latency-aware LAPP cut ResNet-20's
stage-3 residual group to 8 of 64 channels and lost 1.4-5.6 points (docs/RESULTS.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lapp_edge.errors import UserError
from lapp_edge.lapp.controller import LappConfig, LappController, site_min_widths
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.lapp.widths import choose_widths
from lapp_edge.models import build_model, prunable_sites
from lapp_edge.training.trainer import Trainer
from tests.conftest import assert_train_refused, tiny_config

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("ratio", [1.0, 0.875, 0.75, 0.5, 0.3])
def test_each_site_keeps_at_least_its_share_and_one_multiple(ratio: float) -> None:
    sites = prunable_sites(build_model("resnet20", 1, 10, bypass=True, coupled=True))
    minimums = site_min_widths(sites, LappConfig(min_channels=8, max_pruning_ratio=ratio))
    for site, low in zip(sites, minimums):
        assert low == min(site.channels, max(8, math.ceil((1 - ratio) * site.channels - 1e-9))), site.name
    by_name = dict(zip([s.name for s in sites], minimums))
    residual3 = next(name for name in by_name if name.startswith("layer3") and name.endswith("residual"))
    assert by_name[residual3] == {1.0: 8, 0.875: 8, 0.75: 16, 0.5: 32, 0.3: 45}[ratio]


def test_removable_branches_stay_removable_under_a_share_floor() -> None:
    sites = prunable_sites(build_model("resnet20", 1, 10, bypass=True, coupled=True))
    minimums = site_min_widths(sites, LappConfig(min_channels=8, max_pruning_ratio=0.5, block_removal=True, keep_blocks=1))
    for site, low in zip(sites, minimums):
        removable = site.removal is not None and site.branch_index >= 1
        assert low == (0 if removable else max(8, site.channels // 2)), site.name


def test_the_freeze_search_and_the_training_clamp_hold_the_floor() -> None:
    """Learned counts far under the floor (every site at one channel): the width search rounds up to the
    floor's multiple, and the clamp leaves at least the floor's channels above each threshold."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, bypass=True, coupled=True)
    sites = prunable_sites(model)
    cost = build_flops_cost(model, sites, SHAPE)
    config = LappConfig(target=0.6, min_channels=8, max_pruning_ratio=0.75)
    floors = site_min_widths(sites, config)
    widths = choose_widths(np.ones(len(sites)), cost, 0.6, 8, floors)
    assert all(w >= -(-low // 8) * 8 for w, low in zip(widths, floors))
    controller = LappController(sites, cost, config)
    controller.update_masks(with_grad=False)
    with torch.no_grad():
        controller.thresholds.fill_(1e6)                  # every channel would be pruned
    controller.clamp_thresholds()
    assert all(kept >= max(low, 8) for kept, low in zip(controller.hard_counts(), floors))


def test_a_trained_run_keeps_the_floor_and_lands(tmp_path: Path, fmnist) -> None:
    report = Trainer(tiny_config(tmp_path / "run", flops_target=0.3, max_pruning_ratio=0.75), fmnist).run()
    flops = report["flops"]
    assert abs(flops["independent_slim_flops"] / flops["independent_dense_flops"] - 0.3) <= 0.01
    for layer in report["layers"]:
        channels = round(layer["kept"] / layer["kept_ratio"])
        assert layer["kept"] >= max(8, math.ceil(0.25 * channels)), layer


def test_a_floor_above_the_target_is_refused_naming_the_flag(tmp_path: Path, fmnist) -> None:
    with pytest.raises(UserError, match="cannot be reached") as raised:
        Trainer(tiny_config(tmp_path / "run", flops_target=0.2, max_pruning_ratio=0.5), fmnist)
    message = str(raised.value)
    assert "--max-pruning-ratio 0.5" in message and re.search(r"within reach with --max-pruning-ratio 1 \(floor 0\.\d+\)", message)
    assert "\n" not in message and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--max-pruning-ratio", "0"], "--max-pruning-ratio must lie in (0, 1], got 0.0"),
    (["--max-pruning-ratio", "1.5"], "--max-pruning-ratio must lie in (0, 1], got 1.5"),
    (["--max-pruning-ratio", "nan"], "--max-pruning-ratio must lie in (0, 1], got nan"),
    (["--dense", "--max-pruning-ratio", "0.5"], "--max-pruning-ratio"),
])
def test_bad_max_pruning_ratio_is_refused_in_one_line(args: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert_train_refused(args, message, tmp_path / "run", capsys)


def test_the_python_api_takes_the_same_floor() -> None:
    from lapp_edge import api

    model = api.build("torchvision:resnet18", 10, (3, 32, 32))
    with pytest.raises(api.TargetUnreachableError, match=r"at least 0\.5 of each group's"):
        api.Pruner(model, flops_target=0.2, prune_steps=10, max_pruning_ratio=0.5)
    with pytest.raises(UserError, match=r"max_pruning_ratio must lie in \(0, 1\], got 0"):
        api.Pruner(model, flops_target=0.5, prune_steps=10, max_pruning_ratio=0)
    pruner = api.Pruner(model, flops_target=0.5, prune_steps=10, max_pruning_ratio=0.75)
    assert pruner.controller.min_widths == site_min_widths(pruner.sites, LappConfig(min_channels=8, max_pruning_ratio=0.75))
    assert max(pruner.controller.min_widths) == 128          # a quarter of the 512-channel stage
