"""Bypass mode "reparam" (models/reparam.py): one conv per unit, exact folding and baking, and a
trained run whose saved slim model is a plain (baked) network."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lapp_edge.models import ConvBN, build_model
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models.reparam import bake, bypass_units, use_bypass_mode
from tests.models.test_fuse import randomize_batchnorm


def test_reparam_unit_is_one_conv_and_one_bn() -> None:
    generator = torch.Generator().manual_seed(4)
    unit = ConvBN(8, 16, 3, stride=2, bypass=True)
    randomize_batchnorm(unit, generator)
    use_bypass_mode(unit, "reparam")
    x = torch.randn(4, 8, 15, 15, generator=generator)
    assert unit.bypass_bn is not None and unit.bypass_conv is not None
    scale = unit.bypass_bn.weight.view(-1, 1, 1, 1)
    kernel = unit.conv.weight + F.pad(unit.bypass_conv.weight * scale, (1, 1, 1, 1))
    for training in (True, False):
        unit.train(training)
        expected = unit.bn(F.conv2d(x, kernel, None, 2, 1))
        assert torch.allclose(unit(x), expected, atol=1e-5)
    calls: list[str] = []
    modules = {"conv": unit.conv, "bn": unit.bn, "bypass_conv": unit.bypass_conv, "bypass_bn": unit.bypass_bn}
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    unit(x)
    assert calls == ["conv", "bn"]         # one conv (called as a module: FLOPs hooks see it) and one BN
    unit.set_bypass_mode("branch")
    calls.clear()
    unit(x)
    assert calls == ["conv", "bn", "bypass_conv", "bypass_bn"]


def test_reparam_gradients_reach_both_kernels_and_the_scale_not_the_frozen_bias() -> None:
    model = build_model("resnet20", 1, 10, True)
    use_bypass_mode(model, "reparam")
    model(torch.randn(8, 1, 28, 28)).square().mean().backward()
    for unit in bypass_units(model):
        assert unit.bypass_conv is not None and unit.bypass_bn is not None
        assert unit.conv.weight.grad is not None and unit.bypass_conv.weight.grad is not None
        assert unit.bypass_bn.weight.grad is not None
        assert unit.bypass_bn.bias.grad is None and not unit.bypass_bn.bias.requires_grad
    use_bypass_mode(model, "branch")
    assert all(u.bypass_bn is not None and u.bypass_bn.bias.requires_grad for u in bypass_units(model))


def test_fuse_and_bake_are_exact_for_reparam_units() -> None:
    generator = torch.Generator().manual_seed(5)
    model = build_model("resnet20", 1, 10, True)
    randomize_batchnorm(model, generator)
    for unit in bypass_units(model):
        assert unit.bypass_bn is not None
        unit.bypass_bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    use_bypass_mode(model, "reparam")
    model.eval()
    x = torch.randn(3, 1, 28, 28, generator=generator)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(fuse_model(model)(x), reference, atol=1e-4)
        baked = bake(model)
        assert not bypass_units(baked)
        assert torch.allclose(baked(x), reference, atol=1e-5)
        plain = build_model("resnet20", 1, 10, False)     # a baked model is an ordinary bypass-free one
        plain.load_state_dict(baked.state_dict())
        assert torch.allclose(plain.eval()(x), reference, atol=1e-5)


def test_reparam_run_saves_a_baked_slim_model(tmp_path: Path, fmnist) -> None:
    from lapp_edge.models.spec import load_slim_model
    from lapp_edge.training.trainer import Trainer
    from tests.conftest import tiny_config

    trainer = Trainer(tiny_config(tmp_path / "run", bypass_mode="reparam"), fmnist)
    report = trainer.run()
    assert abs(report["flops"]["ratio"] - 0.4) <= 0.01
    assert report["config"]["bypass_mode"] == "reparam"
    model, spec = load_slim_model(tmp_path / "run")
    assert spec.bypass is False and not bypass_units(model)
    images = torch.from_numpy(fmnist.test.images[:16]).float() / 255.0
    with torch.no_grad():
        assert torch.allclose(model(images), trainer.model.eval()(images), atol=1e-4)
