"""Issue 15, kind 4 (malformed fields, the 90-unfriendly reproducer): each case is one line on
stderr naming the file and field, exit 2, no traceback; control characters anywhere in an
echoed value never split that line (lapp-edge and lapp-edge-run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lapp_edge.cli import main
from tests.tiny_package import MODEL_FILE, rehash, write_tiny_package

ROOT = Path(__file__).resolve().parents[2]
CONTROL = st.text(alphabet=st.characters(categories=("Cc", "Zl", "Zp")), min_size=1, max_size=3)


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert len(err.splitlines()) == 1 and err.startswith("lapp-edge: error: ") and "Traceback" not in err, (args, err)
    return err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["train --model", "train --dataset", "train --scorer", "train --device", "bench --target",
                               "bench-package", "verify", "export"]),
       before=st.text(max_size=4), control=CONTROL, after=st.text(max_size=4))
@example(option="train --model", before="resnet", control="\r", after="20")
@example(option="bench --target", before="x", control="\x85", after="y.yaml")
def test_control_characters_in_echoed_values_stay_on_one_line(option: str, before: str, control: str, after: str,
                                                              capsys: pytest.CaptureFixture[str],
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    value = before + control + after
    where = tmp_path_factory.mktemp("ctl")
    if option.startswith("train "):
        args = ["train", "--out", str(where / "run"), option.split()[1], value]
    elif option == "bench --target":
        args = ["bench", str(where / "no-package"), "--target", value]
    elif option == "bench-package":
        args = ["bench", str(where / value), "--target", "x86-ort-fp32"]
    elif option == "verify":
        args = ["verify", str(where / value)]
    else:
        args = ["export", str(where / value), "--out", str(where / "out")]
    one_line_error(args, capsys)


def test_runner_errors_with_control_characters_stay_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "runtime"))
    try:
        from lapp_edge_runtime.cli import main as run_main
    finally:
        sys.path.remove(str(ROOT / "runtime"))
    assert run_main([str(tmp_path / "a\rb\nc.tar.gz"), "--check"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a\\rb\\nc.tar.gz" in err, err


@pytest.mark.parametrize(("field", "value", "message"), [
    ("trace_every", 0, "'trace_every' must be at least 1"),
    ("momentum", -0.5, "'momentum' must lie in [0, 1)"),
    ("flops_target", 2.0, "'flops_target' must lie in (0, 1]"),
    ("batch_size", 0, "'batch_size' must be positive"),
    ("epochs", 10**40, "'epochs' is out of range"),
    ("model", "x" * 5000, "'model' must be a printable string"),
    ("data_dir", "a\nb", "'data_dir' must be a printable string"),
])
def test_saved_config_values_out_of_range_name_file_and_field(field: str, value: object, message: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 2, "prune_epochs": 1, field: value}))
    err = one_line_error(["train", "--out", str(run), "--resume", "--quiet"], capsys)
    assert str(run / "config.json") in err and message in err, err


def test_deeply_nested_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nests deeper" in one_line_error(["train", "--out", str(run), "--resume", "--quiet"], capsys)


def test_garbage_model_onnx_with_matching_hash_is_one_line_for_every_reader(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    (package / MODEL_FILE).write_bytes(b"not onnx")
    rehash(package)
    for args in (["verify", str(package)], ["bench", str(package), "--target", "x86-ort-fp32"]):
        assert "is not an ONNX model" in one_line_error(args, capsys)


def test_onnx_that_parses_but_the_runtime_cannot_load_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    package = write_tiny_package(tmp_path / "pkg")
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input"], ["logits"], domain="nowhere")], "bad",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("nowhere", 1)])
    (package / MODEL_FILE).write_bytes(model.SerializeToString())
    rehash(package)
    data = tmp_path / "data"
    data.mkdir()
    for prefix, count in (("train", 8), ("t10k", 4)):
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            d.to_bytes(4, "big") for d in (count, 28, 28)) + bytes(count * 784))
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + bytes(count))
    err = one_line_error(["bench", str(package), "--target", "x86-ort-fp32", "--data-dir", str(data)], capsys)
    assert "cannot load" in err and "onnxruntime-cpu" in err, err
    assert onnx.load(str(package / MODEL_FILE)).graph.node[0].op_type == "NoSuchOp"
