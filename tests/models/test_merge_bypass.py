"""The freeze's bypass merge (models/reparam.merge_bypass; the default, off with --keep-bypass-after-freeze):
the two-branch unit becomes one conv + BN that computes the same function in eval mode and starts training
where it left off, and a run that merges at freeze trains, resumes exactly and saves a bypass-free slim model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lapp_edge.errors import UserError
from lapp_edge.models import ConvBN, build_model
from lapp_edge.models.reparam import bypass_units, merge_bypass, use_bypass_mode
from lapp_edge.models.spec import load_slim_model
from lapp_edge.training.config import TrainConfig, config_from_saved, merges_bypass_at_freeze, validate_config
from lapp_edge.training.trainer import Trainer
from tests.conftest import StopRun, stop_after_epoch, tiny_config
from tests.models.test_fuse import randomize_batchnorm


@pytest.mark.parametrize("stride", [1, 2])
def test_merged_unit_equals_the_two_branches_in_eval_and_its_batch_statistics_in_training(stride: int) -> None:
    generator = torch.Generator().manual_seed(11)
    unit = ConvBN(8, 16, 3, stride=stride, bypass=True)
    randomize_batchnorm(unit, generator)
    x = torch.randn(32, 8, 12, 12, generator=generator) * 2.0 + 0.5
    with torch.no_grad():
        reference = unit.eval()(x)
        changed = merge_bypass(unit, [x[:16], x[16:]])
        assert changed == [unit] and unit.bypass_conv is None and unit.bypass_bn is None
        assert torch.allclose(unit.eval()(x), reference, atol=1e-4)
        # the new BN's running statistics are the batch statistics of the merged conv's output, so a
        # training-mode step on the same images starts from the same function (up to the variance's
        # unbiased-vs-biased difference on 32 x 6 x 6 values per channel)
        assert torch.allclose(unit.train()(x), reference, atol=5e-3 * float(reference.abs().max()))


def test_merged_resnet_is_exact_and_bypass_free_in_both_modes() -> None:
    generator = torch.Generator().manual_seed(12)
    for mode in ("branch", "reparam"):
        model = build_model("resnet20", 1, 10, True)
        randomize_batchnorm(model, generator)
        use_bypass_mode(model, mode)
        count = len(bypass_units(model))
        x = torch.randn(16, 1, 28, 28, generator=generator)
        with torch.no_grad():
            reference = model.eval()(x)
            changed = merge_bypass(model, [x])
            assert len(changed) == (count if mode == "branch" else 0) and count > 0 and not bypass_units(model)
            assert torch.allclose(model.eval()(x), reference, atol=1e-4)
            plain = build_model("resnet20", 1, 10, False)       # an ordinary bypass-free network
            plain.load_state_dict(model.state_dict())
            assert torch.allclose(plain.eval()(x), reference, atol=1e-4)


def test_merge_needs_images_and_no_masks() -> None:
    model = build_model("resnet20", 1, 10, True)
    with pytest.raises(ValueError, match="at least one batch"):
        merge_bypass(model, [])
    unit = bypass_units(model)[0]
    unit.channel_mask = torch.ones(unit.out_channels)
    with pytest.raises(ValueError, match="channel mask"):
        merge_bypass(model, [torch.randn(2, 1, 28, 28)])


def test_merge_averages_the_moments_it_is_given_to() -> None:
    """Distributed: the summed moments go through `average` before the statistics are set (here it
    doubles them, which leaves mean and variance as they are: sums and counts scale alike)."""
    generator = torch.Generator().manual_seed(13)
    unit = ConvBN(4, 8, 3, bypass=True)
    randomize_batchnorm(unit, generator)
    x = torch.randn(8, 4, 10, 10, generator=generator)
    seen: list[torch.Tensor] = []

    def average(tensors: list[torch.Tensor]) -> None:
        seen.extend(tensors)
        for tensor in tensors:
            tensor.mul_(2.0)

    twin = ConvBN(4, 8, 3, bypass=True)
    twin.load_state_dict(unit.state_dict())
    merge_bypass(unit, [x], average=average)
    merge_bypass(twin, [x])
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and seen[0].shape == (3, 8)
    assert torch.allclose(unit.bn.running_var, twin.bn.running_var) and torch.allclose(unit.bn.weight, twin.bn.weight)


def test_merge_is_refused_where_it_cannot_run_and_skipped_where_there_is_nothing_to_merge(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--bn-recalibration-batches >= 1.*--keep-bypass-after-freeze"):
        validate_config(tiny_config(tmp_path / "run", bn_recalibration_batches=0))
    assert not (tmp_path / "run").exists()
    validate_config(tiny_config(tmp_path / "run", bn_recalibration_batches=0, merge_bypass_at_freeze=False))
    for setting in ({"bypass": False}, {"dense": True}):        # no bypass, or no freeze: the default merges nothing
        config = tiny_config(tmp_path / "run", **setting)
        validate_config(config)
        assert config.merge_bypass_at_freeze and not merges_bypass_at_freeze(config)
    assert merges_bypass_at_freeze(tiny_config(tmp_path / "run"))


def test_the_merge_is_the_default_and_a_run_saved_before_it_keeps_its_bypass(tmp_path: Path) -> None:
    from lapp_edge.cli import build_parser
    from lapp_edge.cli.flags import given_options
    from lapp_edge.cli.train import train_options_given

    parse = build_parser().parse_args
    assert TrainConfig(out="x").merge_bypass_at_freeze
    assert given_options(parse(["train", "--out", "x", "--keep-bypass-after-freeze"]), TrainConfig) == {
        "out": "x", "merge_bypass_at_freeze": False}
    assert train_options_given(parse(["train", "--out", "x", "--merge-bypass-at-freeze"]))["merge_bypass_at_freeze"]
    for both in (["--merge-bypass-at-freeze", "--keep-bypass-after-freeze"], ["--keep-bypass-after-freeze", "--merge-bypass-at-freeze"]):
        with pytest.raises(UserError, match="opposite things"):      # either order: not whichever argparse kept last
            train_options_given(parse(["train", "--out", "x", *both]))
    saved = {key: value for key, value in asdict(TrainConfig(out="x")).items() if key != "merge_bypass_at_freeze"}
    assert not config_from_saved(saved, tmp_path / "config.json").merge_bypass_at_freeze


def test_run_that_merges_at_freeze_resumes_exactly_and_saves_a_plain_slim_model(tmp_path: Path, fmnist) -> None:
    config = dict(epochs=2, merge_bypass_at_freeze=True)     # resumed after epoch 1: just after the merge
    straight = Trainer(tiny_config(tmp_path / "a", **config), fmnist)
    evaluated: list[float] = []
    merged_at_freeze = straight.merge_bypass

    def merge_and_compare() -> int:
        evaluated.append(straight.evaluate())
        count = merged_at_freeze()
        evaluated.append(straight.evaluate())
        return count

    straight.merge_bypass = merge_and_compare          # type: ignore[method-assign]
    report = straight.run()
    assert evaluated[0] == evaluated[1]                 # the merge changes no prediction
    assert report["bypass_merged_at_freeze"] == 9       # ResNet-20's nine inner convs carry the bypass
    text = (tmp_path / "a" / "report.txt").read_text()
    assert "9 unit(s) merged into their kxk conv at freeze" in text and "freeze: " in text
    assert report["freeze_seconds"]["cpu"] > 0 and report["freeze_seconds"]["wall"] > 0
    assert abs(report["flops"]["ratio"] - 0.4) <= 0.01
    model, spec = load_slim_model(tmp_path / "a")
    assert spec.bypass is False and not bypass_units(model)
    images = torch.from_numpy(fmnist.test.images[:16]).float() / 255.0
    with torch.no_grad():
        assert torch.allclose(model(images), straight.model.eval()(images), atol=1e-4)

    with pytest.raises(StopRun):
        Trainer(tiny_config(tmp_path / "b", **config), fmnist).run(on_epoch=stop_after_epoch(1))
    (tmp_path / "b" / ".lock").unlink(missing_ok=True)
    resumed = Trainer(tiny_config(tmp_path / "b", **config), fmnist).run(resume=True)
    assert resumed["accuracy"] == report["accuracy"]
    a = torch.load(tmp_path / "a" / "slim_model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "slim_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
