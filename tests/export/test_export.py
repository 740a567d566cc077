"""Export: fused graph, ORT vs PyTorch verification, the package and its manifest, and bad
input (one line, exit 2, nothing written or overwritten). One tiny LAPP run is trained and
exported once per module."""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lapp_edge.export.package_writer as export_module
from lapp_edge.cli import main
from lapp_edge.data.torch_data import Dataset, normalize
from lapp_edge.errors import UserError
from lapp_edge.export.onnx import OPSET, export_onnx, fused_conv_count
from lapp_edge.export.package_writer import export_run
from lapp_edge.export.verify import VERIFY_IMAGES, ort_session, verify_package
from lapp_edge.models.fuse import fuse_model
from lapp_edge.models import ConvBN, build_model, prunable_sites
from lapp_edge.deploy.package import MANIFEST, MODEL_FILE, load_package, sha256_of
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, build_from_spec, load_slim_model
from lapp_edge.training.trainer import Trainer
from tests.conftest import tiny_config
from tests.models.test_fuse import randomize_batchnorm

FEW_IMAGES = 200  # for the re-checks; the shipped export itself uses VERIFY_IMAGES


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def conv_nodes(path: Path) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> Path:
    """A run whose slim model keeps its bypass (--keep-bypass-after-freeze), so export has a bypass to fold."""
    out = tmp_path_factory.mktemp("export") / "run"
    Trainer(tiny_config(out, merge_bypass_at_freeze=False), fmnist).run()
    return out


@pytest.fixture(scope="module")
def package(trained_run: Path) -> Path:
    out = trained_run.parent / "models" / "tiny"
    export_run(trained_run, out)
    return out


def copy_of(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


# --- fusion --------------------------------------------------------------------------------

def random_slim_resnet(generator: torch.Generator) -> nn.Module:
    """ResNet-20 with bypass, every site cut to a random width, BN with non-trivial statistics."""
    dense = build_model("resnet20", 1, 10, bypass=True)
    widths = {site.name: int(torch.randint(1, site.channels + 1, (1,), generator=generator))
              for site in prunable_sites(dense)}
    model = build_from_spec(ArchitectureSpec("resnet20", 1, 10, 28, True, widths)).eval()
    randomize_batchnorm(model, generator)
    return model


def test_fusion_is_exact_on_a_random_slim_model_with_stride_two_bypass() -> None:
    generator = torch.Generator().manual_seed(3)
    model = random_slim_resnet(generator)
    units = [m for m in model.modules() if isinstance(m, ConvBN)]
    assert any(u.bypass_conv is not None and u.conv.stride == (2, 2) for u in units)
    fused = fuse_model(model)
    assert not any(isinstance(m, (ConvBN, nn.BatchNorm2d)) for m in fused.modules())
    assert fused_conv_count(fused) == len(units)  # one conv per ConvBN: every bypass is gone
    x = torch.randn(5, 1, 28, 28, generator=generator)
    with torch.no_grad():
        reference, result = model(x), fused(x)
    assert float((reference - result).abs().max() / reference.abs().max().clamp(min=1.0)) <= 1e-5


def test_fusion_is_exact_on_the_trained_model(trained_run: Path, fmnist: Dataset) -> None:
    model, _ = load_slim_model(trained_run)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert any(isinstance(m, ConvBN) and m.bypass_conv is not None and m.conv.stride == (2, 2) for m in model.modules())
    images = normalize(fmnist.test.images[:256], fmnist.info)  # type: ignore[attr-defined]
    with torch.no_grad():
        reference, result = model(images), fuse_model(model)(images)
    assert float((reference - result).abs().max()) <= 1e-5 * max(1.0, float(reference.abs().max()))


def test_a_run_merged_at_freeze_exports_one_conv_per_unit_and_verifies(tmp_path: Path, fmnist: Dataset) -> None:
    run = tmp_path / "run"                          # the default: the bypass was merged into its conv at freeze
    report = Trainer(tiny_config(run), fmnist).run()
    assert report["bypass_merged_at_freeze"] == 9
    model, _ = load_slim_model(run)
    assert not any(isinstance(m, ConvBN) and m.bypass_conv is not None for m in model.modules())
    manifest = export_run(run, tmp_path / "package", images=FEW_IMAGES)
    assert conv_nodes(tmp_path / "package" / MODEL_FILE)["Conv"] == fused_conv_count(fuse_model(model))
    assert manifest["verification"]["worst_excess"] <= 1 and manifest["verification"]["top1_disagreements"] == 0


# --- the exported graph and package ----------------------------------------------------------

def test_exported_graph_is_fused_with_a_dynamic_batch(package: Path) -> None:
    model, _ = load_slim_model(package)
    proto = onnx.load(package / MODEL_FILE)
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["BatchNormalization"] == 0
    assert ops["Conv"] == fused_conv_count(fuse_model(model))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in proto.opset_import)
    assert not (package / f"{MODEL_FILE}.data").exists()
    session = ort_session(package / MODEL_FILE)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4


def test_unfused_export_keeps_the_bypass_convs_but_folds_batchnorm(trained_run: Path, tmp_path: Path) -> None:
    model, _ = load_slim_model(trained_run)
    path = tmp_path / "unfused.onnx"
    path.write_bytes(export_onnx(model, (1, 28, 28)))
    bypasses = sum(1 for m in model.modules() if isinstance(m, ConvBN) and m.bypass_conv is not None)
    ops = conv_nodes(path)
    assert bypasses > 0 and ops["BatchNormalization"] == 0
    assert ops["Conv"] == fused_conv_count(fuse_model(model)) + bypasses


def test_manifest_follows_the_contract(package: Path, trained_run: Path) -> None:
    manifest = load_package(package).manifest
    report = json.loads((trained_run / "report.json").read_text())
    spec = json.loads((trained_run / SLIM_SPEC).read_text())
    assert manifest["format"] == 1 and manifest["model"] == "resnet20" and manifest["dataset"] == "fashion-mnist"
    assert manifest["input"]["name"] == "input" and manifest["input"]["shape"] == [1, 28, 28]
    assert manifest["input"]["mean"] == spec["mean"] and manifest["input"]["std"] == spec["std"]
    assert manifest["output"] == {"name": "logits", "num_classes": 10}
    assert manifest["class_names"] == spec["class_names"] and len(manifest["class_names"]) == 10
    assert manifest["widths"] == spec["widths"] and manifest["dense_widths"] == spec["dense_widths"]
    assert manifest["flops"]["slim_macs"] == report["flops"]["slim_macs"]
    assert manifest["flops"]["dense_macs"] == report["flops"]["dense_macs"]
    assert (manifest["params"]["dense"], manifest["params"]["slim"]) == (report["params"]["dense"], report["params"]["slim"])
    assert manifest["accuracy"]["test_top1"] == report["accuracy"]["test_top1"]
    verification = manifest["verification"]
    assert verification["images"] == VERIFY_IMAGES
    assert verification["worst_excess"] <= 1.0 and verification["top1_disagreements"] == 0
    assert verification["max_rel_diff"] <= 1e-5 and verification["top1_agreement"] == 1.0
    assert verification["tolerance"] == {"rtol": 1e-4, "atol": 1e-4, "rule": "|y - e| <= atol + rtol * max|e| per sample"}
    assert manifest["export"]["opset"] == OPSET and set(manifest["export"]["versions"]) == {"torch", "onnx", "onnxruntime"}
    assert set(manifest["files"]) == {MODEL_FILE, SLIM_SPEC, SLIM_WEIGHTS}
    for name, digest in manifest["files"].items():
        assert sha256_of(package / name) == digest
    assert (package / SLIM_WEIGHTS).read_bytes() == (trained_run / SLIM_WEIGHTS).read_bytes()
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_verify_rebuilds_the_reference_from_the_package_alone(package: Path, tmp_path: Path, capsys) -> None:
    moved = copy_of(package, tmp_path / "elsewhere")
    result = verify_package(moved, images=FEW_IMAGES)
    assert result.passed and result.images == FEW_IMAGES
    code, _ = cli(["verify", str(moved)], capsys)
    assert code == 0


# --- tampering -----------------------------------------------------------------------------

def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(directory: Path, change) -> None:  # noqa: ANN001
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


TAMPERING = {
    "model.onnx byte": (lambda d: flip_one_byte(d / MODEL_FILE), "does not match its sha256"),
    "slim weights byte": (lambda d: flip_one_byte(d / SLIM_WEIGHTS), "does not match its sha256"),
    "manifest hash": (lambda d: edit_manifest(d, lambda m: m["files"].__setitem__(MODEL_FILE, "0" * 64)),
                      "does not match its sha256"),
    "manifest mean": (lambda d: edit_manifest(d, lambda m: m["input"].__setitem__("mean", [0.5])), "normalisation"),
    "manifest input name": (lambda d: edit_manifest(d, lambda m: m["input"].__setitem__("name", "x")), "input/output names"),
    "manifest not json": (lambda d: (d / MANIFEST).write_text("{\"format\": 1, "), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_catches_tampering(package: Path, tmp_path: Path, capsys, case: str) -> None:
    tamper, message = TAMPERING[case]
    broken = copy_of(package, tmp_path / "pkg")
    tamper(broken)
    code, err = cli(["verify", str(broken)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_verify_catches_a_rehashed_model_that_computes_something_else(package: Path, tmp_path: Path, capsys) -> None:
    """A consistent package (hashes updated) whose ONNX weights differ from its slim weights."""
    broken = copy_of(package, tmp_path / "pkg")
    model, _ = load_slim_model(broken)
    fused = fuse_model(model)
    with torch.no_grad():
        fused.fc.bias.add_(0.01)  # type: ignore[union-attr]
    (broken / MODEL_FILE).write_bytes(export_onnx(fused, (1, 28, 28)))
    edit_manifest(broken, lambda m: m["files"].__setitem__(MODEL_FILE, sha256_of(broken / MODEL_FILE)))
    code, err = cli(["verify", str(broken)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "max |diff|" in err, err


# --- bad input to export -------------------------------------------------------------------

def corrupt_run(case: str, run: Path) -> None:
    if case == "no finished model":
        (run / SLIM_WEIGHTS).unlink()
        (run / "report.json").unlink()
    elif case == "truncated weights":
        data = (run / SLIM_WEIGHTS).read_bytes()
        (run / SLIM_WEIGHTS).write_bytes(data[: len(data) // 2])
    elif case == "broken architecture":
        (run / SLIM_SPEC).write_text("{\"model\": \"resnet20\", ")
    elif case == "architecture of another model":
        spec = json.loads((run / SLIM_SPEC).read_text())
        spec["widths"] = {name: max(1, width - 1) for name, width in spec["widths"].items()}
        (run / SLIM_SPEC).write_text(json.dumps(spec))
    elif case == "missing report":
        (run / "report.json").unlink()


BAD_RUNS = {
    "no finished model": "no finished model",
    "truncated weights": "corrupt",
    "broken architecture": "not valid JSON",
    "architecture of another model": "does not match",
    "missing report": "report.json is missing",
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_gives_one_line_and_writes_nothing(trained_run: Path, tmp_path: Path, capsys, case: str) -> None:
    run = copy_of(trained_run, tmp_path / "run")
    corrupt_run(case, run)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, err = cli(["export", str(run), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and BAD_RUNS[case] in err, err
    assert snapshot(tmp_path) == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_out_holding_a_different_model_is_not_overwritten(trained_run: Path, package: Path, tmp_path: Path, capsys) -> None:
    run = copy_of(trained_run, tmp_path / "run")
    state = torch.load(run / SLIM_WEIGHTS, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0
    torch.save(state, run / SLIM_WEIGHTS)
    out = copy_of(package, tmp_path / "models")
    before = snapshot(tmp_path)
    code, err = cli(["export", str(run), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "different model" in err, err
    assert snapshot(tmp_path) == before


def test_out_holding_other_files_is_refused(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = cli(["export", str(trained_run), "--out", str(out)], capsys)
    assert code == 2 and "not a model package" in err
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_reexporting_the_same_model_is_a_verified_no_op(trained_run: Path, package: Path, tmp_path: Path) -> None:
    out = copy_of(package, tmp_path / "models")
    before = snapshot(out)
    manifest = export_run(trained_run, out, images=FEW_IMAGES)
    assert snapshot(out) == before and manifest == load_package(out).manifest


def test_a_model_that_fails_verification_is_not_written(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    def broken_fuse(model: nn.Module) -> nn.Module:
        fused = fuse_model(model)
        with torch.no_grad():
            fused.fc.bias.add_(0.01)  # type: ignore[union-attr]
        return fused

    monkeypatch.setattr(export_module, "fuse_model", broken_fuse)
    out = tmp_path / "models" / "bad"
    with pytest.raises(UserError, match="was not exported.*max \\|diff\\|"):
        export_run(trained_run, out, images=FEW_IMAGES)
    assert not out.exists()
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


# --- issue 14: the check is scale-aware -------------------------------------------------------

def scaled_run(trained_run: Path, destination: Path, factor: float) -> Path:
    """A copy of the run whose classifier is scaled by `factor` (logits x factor: the same model up
    to scale, the same MACs)."""
    run = copy_of(trained_run, destination)
    state = torch.load(run / SLIM_WEIGHTS, weights_only=True)
    state["fc.weight"] = state["fc.weight"] * factor
    state["fc.bias"] = state["fc.bias"] * factor
    torch.save(state, run / SLIM_WEIGHTS)
    return run


def test_a_correct_model_with_large_logits_is_exported(trained_run: Path, tmp_path: Path) -> None:
    # logits in the thousands: fp32 rounding alone exceeds an absolute 1e-4, the scale-aware rule passes
    run = scaled_run(trained_run, tmp_path / "run", 1000.0)
    manifest = export_run(run, tmp_path / "models" / "big", images=FEW_IMAGES)
    check = manifest["verification"]
    assert check["max_abs_diff"] > 1e-4, "the test needs logits large enough to beat the old absolute limit"
    assert check["worst_excess"] <= 1.0 and check["max_rel_diff"] <= 1e-5 and check["top1_disagreements"] == 0
    assert verify_package(tmp_path / "models" / "big", images=FEW_IMAGES).passed


@pytest.mark.parametrize("factor", [1.0, 1000.0])
def test_a_wrong_model_is_refused_at_any_logit_scale(trained_run: Path, tmp_path: Path, monkeypatch, factor: float) -> None:
    # a bias error of 0.01 x the logits' scale (about 1e-3 of them) is refused whether logits are ~10 or ~10^4
    run = scaled_run(trained_run, tmp_path / "run", factor)

    def broken_fuse(model: nn.Module) -> nn.Module:
        fused = fuse_model(model)
        with torch.no_grad():
            fused.fc.bias.add_(0.01 * factor)  # type: ignore[union-attr]
        return fused

    monkeypatch.setattr(export_module, "fuse_model", broken_fuse)
    with pytest.raises(UserError, match="was not exported.*of the largest \\|logit\\|"):
        export_run(run, tmp_path / "models" / "bad", images=FEW_IMAGES)
    assert not (tmp_path / "models" / "bad").exists()
