"""A user's own model (models/traced.py, api.py): models the project did not write, made LAPP-ready
by tracing, trained a few steps with LAPP masks, frozen at a FLOPs target, slimmed, exported.

Per torchvision model (random weights, 10 classes, a small input):
- the coupled groups found are sites the project can mask and slice, the unprunable convs are
  exactly the ones named in the single warning (SE squeezes, grouped convs, concatenation);
- the FLOPs cost equals torch's FlopCounterMode on the fused model;
- LAPP at target 0.5 (controller + lapp.freeze) lands within +-1% of the dense FLOPs, as counted
  by FlopCounterMode on the slim model;
- the slim logits equal the masked logits (final masks, before slicing);
- the slim model saved as a spec (torchvision:<name> + widths) rebuilds to the same logits;
- the fused ONNX export matches ONNX Runtime (<= 1e-4 relative to the logit scale).
Then: small models "a user wrote" (tests/models/user_nets.py) for SE gates, concatenation, a
numerically unsafe activation, the CLI (`--model module:function` / `torchvision:<name>`) and bad input.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lapp_edge import api
from lapp_edge.cli import main
from lapp_edge.errors import UserError
from lapp_edge.lapp.controller import LappConfig, LappController
from lapp_edge.lapp.flops import build_flops_cost
from lapp_edge.lapp.freeze import freeze
from lapp_edge.models import ConvBN, build_model, prunable_sites
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models.traced import (
    ExampleInputError, ModelReferenceError, NoPrunableLayerError, TracedModel, UnprunableLayersWarning,
    UntraceableModelError, lapp_ready,
)
from lapp_edge.training.task import LappTask
from tests.models import user_nets

TARGET = 0.5


def flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fuse_model(model)(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


def built_with_warnings(build) -> tuple[TracedModel, list[str]]:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build()
    messages = [str(w.message) for w in caught if issubclass(w.category, UnprunableLayersWarning)]
    return model, messages


def named_in(message: str) -> set[str]:
    """The layer paths a warning line names."""
    return set(re.findall(r"net\.[\w.\-]+", message))


# --- expected unprunable convs, from each model's own structure ------------------------------------

def se_squeezes(model: nn.Module) -> set[str]:
    from torchvision.ops import SqueezeExcitation

    return {f"{name}.fc1" for name, m in model.named_modules() if isinstance(m, SqueezeExcitation)}


def regnet_grouped(model: nn.Module) -> set[str]:
    # the grouped 3x3 conv of every block and the 1x1 conv feeding it
    return {name.replace(".f.b.0", ".f.a.0") for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1} | {name for name, m in model.named_modules()
                                                             if isinstance(m, nn.Conv2d) and m.groups > 1}


def densenet_concatenated(model: nn.Module) -> set[str]:
    # the stem, each dense layer's growth conv and each transition conv feed a concatenation
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (name.endswith(("conv0", "conv2")) or ".transition" in name)}


# name, input size, expected unprunable (from the plain torchvision model), reason, slow
MODELS = [
    ("resnet18", 64, lambda m: set(), None, False),
    ("mobilenet_v3_small", 64, se_squeezes, "no BatchNorm after the conv", False),
    ("mobilenet_v2", 32, lambda m: set(), None, True),
    ("regnet_x_400mf", 32, regnet_grouped, "a grouped conv", True),
    ("efficientnet_b0", 32, se_squeezes, "no BatchNorm after the conv", True),
    ("densenet121", 32, densenet_concatenated, "concatenation", True),
]


def lapp_steps(model: nn.Module, shape: tuple[int, int, int], steps: int = 3) -> tuple[LappController, torch.optim.Optimizer]:
    """A few training steps with LAPP masks (random data) toward the FLOPs target."""
    sites = prunable_sites(model)
    cost = build_flops_cost(model, sites, shape)
    controller = LappController(sites, cost, LappConfig(target=TARGET, channel_multiple=8, min_channels=8))
    task = LappTask(controller, prune_steps=steps, trace_every=10**6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    from lapp_edge.training.run_dir import RunState

    state, generator = RunState(), torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        x, y = torch.randn(4, *shape, generator=generator), torch.randint(0, 10, (4,), generator=generator)
        task.before_forward()
        loss = task.loss(F.cross_entropy(model(x), y), step)
        optimizer.zero_grad()
        task.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_step(step, state)
    return controller, optimizer


@pytest.mark.parametrize(
    ("name", "size", "expected", "reason"),
    [pytest.param(n, s, e, r, marks=[pytest.mark.slow] if slow else [], id=n) for n, s, e, r, slow in MODELS],
)
def test_torchvision_model_prunes_to_target_slim_equals_masked_and_exports(name: str, size: int, expected, reason,  # type: ignore[no-untyped-def]
                                                                           tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    shape = (3, size, size)
    plain = torchvision.models.get_model(name, weights=None, num_classes=10)
    unprunable = {f"net.{path}" for path in expected(plain)}
    model, messages = built_with_warnings(lambda: api.build(f"torchvision:{name}", 10, shape))

    # sites: every producer a ConvBN, bypass where the kernel allows; the warning names exactly the unprunable convs
    sites = prunable_sites(model)
    assert sites and len({s.name for s in sites}) == len(sites)
    units = [id(u) for s in sites for u in s.units]
    assert len(units) == len(set(units)), "a unit belongs to two sites"
    assert all(isinstance(p, ConvBN) and p.bypass_conv is not None for s in sites for p in s.producers)
    if unprunable:
        assert len(messages) == 1, messages
        assert named_in(messages[0]) == unprunable and set(model.unprunable) == unprunable
        assert reason in messages[0]
    else:
        assert not messages and not model.unprunable
    pruned = {f"net.{n}" for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)} - unprunable
    members = {id(m) for s in sites for m in (*s.units, *s.gates)}
    in_sites = {n for n, m in model.named_modules() if id(m) in members}
    assert in_sites == pruned, "every conv is either in a site or named unprunable"

    # FLOPs: our cost model == FlopCounterMode, dense
    cost = build_flops_cost(model, sites, shape)
    dense_macs = flop_counter_macs(model, shape)
    assert cost.dense_macs == dense_macs

    # a few LAPP steps, then the freeze path; the masked logits are taken with the final masks, before slicing
    controller, optimizer = lapp_steps(model, shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5))
    masked: list[torch.Tensor] = []
    slice_channels = controller.slim

    def record_then_slim(plan, optimizer=None):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            masked.append(model.eval()(x))
        slice_channels(plan, optimizer)

    controller.slim = record_then_slim  # type: ignore[method-assign]
    plan = freeze(controller, optimizer)
    with torch.no_grad():
        slim_logits = model.eval()(x)
    scale = float(masked[0].abs().max().clamp(min=1.0))
    assert float((masked[0] - slim_logits).abs().max()) / scale <= 1e-5

    slim_macs = flop_counter_macs(model, shape)
    assert abs(slim_macs / dense_macs - TARGET) <= 0.01, (slim_macs / dense_macs, plan.widths)
    assert slim_macs == float(cost.macs(torch.tensor([float(plan.widths[s.name]) for s in sites], dtype=torch.float64)))
    assert any(plan.widths[s.name] < model.dense_widths[s.name] for s in sites)

    # spec round trip: torchvision:<name> + widths rebuild the same slim model
    api.save(model, tmp_path / "slim")
    rebuilt = api.load(tmp_path / "slim")
    with torch.no_grad():
        assert float((rebuilt(x) - slim_logits).abs().max()) / scale <= 1e-5

    # export: fused ONNX vs ONNX Runtime
    result = api.export(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").is_file()
    assert result.max_abs_diff <= 1e-4 * result.logit_scale
    assert result.op_counts.get("Conv", 0) == sum(1 for m in fuse_model(model).modules() if isinstance(m, nn.Conv2d))


def test_groups_off_leaves_residual_groups_unprunable_and_names_them() -> None:
    model, messages = built_with_warnings(lambda: build_model("torchvision:resnet18", 3, 10, bypass=False, coupled=False,
                                                              input_size=32))
    sites = prunable_sites(model)
    assert sites and all(len(s.producers) == 1 for s in sites)
    assert len(messages) == 1 and "coupled groups are off" in messages[0]
    assert {"net.conv1", "net.layer1.0.conv2", "net.layer4.0.downsample.0"} <= named_in(messages[0])


# --- small models a user wrote ---------------------------------------------------------------------

def test_user_net_with_residual_depthwise_and_squeeze_excitation() -> None:
    model, messages = built_with_warnings(lambda: lapp_ready(user_nets.small_net(10, 3), torch.zeros(1, 3, 32, 32)))
    layouts = {layout.name: layout for layout in model.site_layouts}
    assert set(layouts) == {"net.stem.0.residual", "net.a.0", "net.expand.0", "net.project.0"}
    assert layouts["net.stem.0.residual"].producers == ["net.stem.0", "net.b.0"]
    assert layouts["net.stem.0.residual"].consumers == ["net.a.0", "net.expand.0"]
    expand = layouts["net.expand.0"]
    assert (expand.followers, expand.gates, expand.consumers) == (["net.depthwise.0"], ["net.se_expand"],
                                                                 ["net.se_squeeze", "net.project.0"])
    assert layouts["net.project.0"].consumers == ["net.fc"]
    assert len(messages) == 1 and named_in(messages[0]) == {"net.se_squeeze"}
    assert "depthwise" not in str(model.unprunable)
    assert isinstance(model.get_submodule("net.stem.0"), ConvBN) and isinstance(model.get_submodule("net.stem.1"), nn.Identity)


def test_concatenation_fed_convs_stay_unprunable() -> None:
    model, messages = built_with_warnings(lambda: lapp_ready(user_nets.ConcatNet(), torch.zeros(1, 3, 32, 32)))
    assert [layout.name for layout in model.site_layouts] == ["net.stem.0", "net.mix.0"]
    assert len(messages) == 1 and named_in(messages[0]) == {"net.left.0", "net.right.0"} and "concatenation" in messages[0]


def test_numerical_check_catches_activation_not_zero_at_zero_and_an_untraced_input_add() -> None:
    model, messages = built_with_warnings(lambda: lapp_ready(user_nets.SigmoidNet(), torch.zeros(1, 3, 32, 32)))
    assert [layout.name for layout in model.site_layouts] == ["net.stem.0", "net.body.0"]
    assert model.unprunable == {"net.into_input.0": "masked channels do not stay zero after it",
                                "net.gated.0": "masked channels do not stay zero after it"}
    assert len(messages) == 1 and named_in(messages[0]) == {"net.into_input.0", "net.gated.0"}


def test_pruner_in_own_loop_reaches_target_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, _ = built_with_warnings(lambda: lapp_ready(user_nets.small_net(10, 3), torch.zeros(1, 3, 32, 32)))
    dense = flop_counter_macs(net, (3, 32, 32))
    pruner = api.Pruner(net, flops_target=0.6, prune_steps=6, channel_multiple=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(6):
        x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        loss = pruner.penalize(F.cross_entropy(net(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
    assert pruner.controller.thresholds.grad is None
    widths = pruner.freeze(optimizer, calibration_batches=[torch.randn(8, 3, 32, 32, generator=generator)])
    assert abs(flop_counter_macs(net, (3, 32, 32)) / dense - 0.6) <= 0.01
    assert widths == {s.name: s.channels for s in prunable_sites(net)}
    net.eval()
    with torch.no_grad():                          # the hook is gone: no mask is set any more
        net(torch.zeros(1, 3, 32, 32))
    assert all(u.channel_mask is None for s in prunable_sites(net) for u in s.units)
    result = api.export(net, tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4 * result.logit_scale
    with pytest.raises(api.UserModelError, match="only a model built from a reference"):
        api.save(net, tmp_path / "spec")


# --- bad input (Python) ---------------------------------------------------------------------------

def test_bad_input_raises_one_line_errors() -> None:
    with pytest.raises(UntraceableModelError, match="cannot be traced through autograd.*body.0"):
        lapp_ready(user_nets.untraceable_net(10, 3), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ExampleInputError, match=r"shape \(1, 1, 32, 32\)"):
        lapp_ready(user_nets.small_net(10, 3), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ExampleInputError, match="N x C x H x W"):
        lapp_ready(user_nets.small_net(10, 3), torch.zeros(3, 32, 32))
    with pytest.raises(NoPrunableLayerError, match="no conv LAPP can prune"):
        lapp_ready(user_nets.no_batchnorm_net(10, 3), torch.zeros(1, 3, 16, 16))
    with pytest.raises(NoPrunableLayerError, match="no Conv2d"):
        lapp_ready(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), torch.zeros(1, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnprunableLayersWarning)
        costly = lapp_ready(user_nets.costly_unprunable_net(10, 3), torch.zeros(1, 3, 16, 16))
    with pytest.raises(api.TargetUnreachableError, match="cannot be reached.*2 unprunable conv"):
        api.Pruner(costly, flops_target=0.5, prune_steps=10)
    for reference, pattern in [("torchvision:no_such_net", "unknown torchvision model"),
                               ("tests.models.user_nets:missing", "has no 'missing'"),
                               ("no_such_module_xyz:build", "cannot import module"),
                               ("tests.models.user_nets:NOT_A_MODEL", "not a Python function or class"),
                               ("tests.models.user_nets:not_a_module", "not an nn.Module"),
                               ("tests.models.user_nets:_private", "private"),
                               ("not a reference:x y", "module:function")]:
        with pytest.raises(ModelReferenceError, match=pattern):
            build_model(reference, 3, 10, input_size=16)
    for error in (UntraceableModelError, ExampleInputError, NoPrunableLayerError, ModelReferenceError, api.TargetUnreachableError):
        assert issubclass(error, UserError)


def test_an_unprunable_layer_is_named_with_its_cause_not_a_symptom_of_it() -> None:
    # the BN after each conv is in place; what stops the groups is the flatten of the 7x7 map (which also
    # re-indexes that BN's channels: a symptom, not the cause, so it is not what the warning names)
    with pytest.warns(UnprunableLayersWarning) as caught:
        lapp_ready(user_nets.view_flatten_net(10, 1), torch.zeros(1, 1, 28, 28))
    text = str(caught[0].message)
    assert "a flattened spatial map" in text and "BatchNorm" not in text, text
    # no BN at all, then a flatten: the missing BN is the cause named
    with pytest.raises(NoPrunableLayerError, match=r"\(no BatchNorm after the conv\)"):
        lapp_ready(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10)),
                   torch.zeros(1, 1, 28, 28))


def test_a_module_reference_is_found_in_the_working_directory(tmp_path: Path) -> None:
    # `lapp-edge` is a console script: unlike `python -m`, nothing puts the working directory on sys.path.
    # -I runs Python the same way (no working directory, no PYTHONPATH on sys.path).
    (tmp_path / "mynets.py").write_text("import torch.nn as nn\n\ndef build(num_classes=10):\n    return nn.Conv2d(1, 4, 3)\n")
    code = "from lapp_edge.models.traced import resolve_builder; print(resolve_builder('mynets:build').__module__)"
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "mynets", done.stderr
    # ... and only for a module found there: an empty folder named like an optional package (tensorrt) must not
    # become importable because a reference to an installed module was resolved
    (tmp_path / "tensorrt").mkdir()
    code = ("import importlib.util, os, sys; from lapp_edge.models.traced import resolve_builder; resolve_builder('json:loads'); "
            "print(importlib.util.find_spec('tensorrt') is None and os.getcwd() not in sys.path)")
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr


# --- the CLI ----------------------------------------------------------------------------------------

def cli_train(tmp_path: Path, model: str, *extra: str) -> list[str]:
    return ["train", "--model", model, "--out", str(tmp_path / "run"), "--epochs", "2", "--prune-epochs", "1",
            "--train-subset", "128", "--test-subset", "100", "--batch-size", "32", "--threads", "1",
            "--bn-recalibration-batches", "2", "--quiet", *extra]


@pytest.mark.parametrize(("model", "extra", "pattern"), [
    ("tests.models.user_nets:untraceable_net", (), "cannot be traced through autograd"),
    ("tests.models.user_nets:rgb_only_net", (), r"does not run on an example input of shape \(1, 1, 28, 28\)"),
    ("tests.models.user_nets:no_batchnorm_net", (), "no conv LAPP can prune"),
    ("tests.models.user_nets:costly_unprunable_net", ("--flops-target", "0.5"), "FLOPs target 0.5 cannot be reached"),
    ("tests.models.user_nets:nothing_here", (), "has no 'nothing_here'"),
    ("torchvision:not_a_model", (), "unknown torchvision model"),
    ("tests.models.user_nets:too_few_outputs", (), r"outputs \(1, 7\) .* the dataset has 10 classes"),
    ("tests.models.user_nets:too_many_outputs", (), r"outputs \(1, 12\) .* must output logits of shape \(1, 10\)"),
    ("tests.models.user_nets:exiting_builder", (), r"failed: it called sys.exit\(3\)"),
])
def test_cli_bad_user_model_exits_2_in_one_line_writing_nothing(model: str, extra: tuple[str, ...], pattern: str,
                                                                  tmp_path: Path, fmnist,  # type: ignore[no-untyped-def]
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(cli_train(tmp_path, model, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lapp-edge: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    assert all(line.startswith(("lapp-edge: error:", "lapp-edge: warning:")) for line in err)  # a warning may name unprunable layers
    assert not (tmp_path / "run").exists()


def test_cli_trains_a_user_model_and_its_spec_rebuilds_it(tmp_path: Path, fmnist,  # type: ignore[no-untyped-def]
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lapp_edge.fileio import read_json
    from lapp_edge.models.spec import load_slim_model

    assert main(cli_train(tmp_path, "tests.models.user_nets:small_net", "--flops-target", "0.6",
                          "--channel-multiple", "4")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lapp-edge: warning: 1 conv layer(s) of tests.models.user_nets:small_net stay at full width "
                   "(LAPP cannot prune them): no BatchNorm after the conv: net.se_squeeze"]
    spec = read_json(tmp_path / "run" / "architecture.json")
    assert spec["model"] == "tests.models.user_nets:small_net" and spec["input_size"] == 28 and spec["in_channels"] == 1
    report = read_json(tmp_path / "run" / "report.json")
    assert abs(report["flops"]["slim_macs"] / report["flops"]["dense_macs"] - 0.6) <= 0.01
    model, _ = load_slim_model(tmp_path / "run")
    assert {s.name: s.channels for s in prunable_sites(model)} == spec["widths"]


def test_cli_accepts_torchvision_names_for_one_channel_data(tmp_path: Path, fmnist,  # type: ignore[no-untyped-def]
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from lapp_edge.fileio import read_json

    assert main(cli_train(tmp_path, "torchvision:resnet18", "--train-subset", "64", "--test-subset", "64")) == 0
    report = read_json(tmp_path / "run" / "report.json")
    assert report["model"] == "torchvision:resnet18"
    assert abs(report["flops"]["slim_macs"] / report["flops"]["dense_macs"] - 0.4) <= 0.01
    assert not capsys.readouterr().err.strip()


# --- docs/BYOM.md ------------------------------------------------------------------------------------

def test_byom_doc_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "BYOM.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    assert len(code.strip().splitlines()) < 15
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/BYOM.md", "exec"), namespace)  # noqa: S102 - the documented example, run as written
    net, pruner = namespace["net"], namespace["pruner"]
    assert (tmp_path / "resnet18-slim.onnx").is_file()
    ratio = flop_counter_macs(net, (3, 32, 32)) / pruner.cost.dense_macs  # type: ignore[attr-defined, arg-type]
    assert abs(ratio - 0.5) <= 0.01


def test_a_user_model_that_cannot_run_in_channels_last_trains_nchw_and_says_so(tmp_path: Path, fmnist) -> None:  # type: ignore[no-untyped-def]
    """channels_last is the CPU default; a model that flattens with .view needs NCHW strides. It is not
    refused: it trains NCHW, and the run's decisions say why."""
    from lapp_edge.training.trainer import Trainer
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path / "run", model="tests.models.user_nets:view_flatten_net", flops_target=0.53,
                         channel_multiple=8, train_subset=128, test_subset=100, batch_size=32)
    assert config.memory_format == "channels_last"
    trainer = Trainer(config, fmnist)
    notes = [line for line in trainer.decisions() if line.startswith("layout:")]
    assert len(notes) == 1 and "does not run in channels_last (view size is not compatible" in notes[0], notes
    report = trainer.run()
    assert report["accuracy"]["test_top1"] > 0
    assert all(m.weight.is_contiguous() for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    # a model that does run in channels_last gets no such line
    assert not [line for line in Trainer(tiny_config(tmp_path / "other", model="tests.models.user_nets:small_net",
                                                      dense=True, train_subset=128, test_subset=100), fmnist).decisions()
                if line.startswith("layout:")]
