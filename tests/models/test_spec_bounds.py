"""Issue 15, kinds 2 and 4 for architecture.json: every field is checked before anything is
built from it, and each width is bounded by the family's own dense width (not by the file's
`dense_widths`), so one edited number (a width of 10**9, the 05 reproducer) is one line,
never a 24 GB allocation."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch

from lapp_edge.errors import UserError
from lapp_edge.models import build_model, prunable_sites
from lapp_edge.models import spec as spec_module
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, build_from_spec, load_slim_model


@pytest.fixture(autouse=True)
def resize_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (instead of allocating gigabytes) if a width above the family's reaches the resize:
    these tests must stay safe to run with a check removed."""
    real = spec_module.resize_to_widths

    def guarded(model, sites, widths):  # noqa: ANN001, ANN202
        for site in sites:
            low = 0 if site.removal is not None else 1          # 0: a removed residual branch (--block-removal)
            assert site.name not in widths or low <= int(widths[site.name]) <= site.channels, "a bad width reached the resize"
        return real(model, sites, widths)

    monkeypatch.setattr(spec_module, "resize_to_widths", guarded)


def spec_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    widths = {site.name: site.channels for site in prunable_sites(build_model("resnet20", 1, 10, True))}
    spec = ArchitectureSpec("resnet20", 1, 10, 28, True, widths, dict(widths), [0.286], [0.353], [str(i) for i in range(10)])
    (directory / SLIM_SPEC).write_text(json.dumps(spec.to_dict()))
    torch.save(build_from_spec(spec).state_dict(), directory / SLIM_WEIGHTS)
    return directory


CASES = [
    ("widths.layer1.0.conv1", 10**9, "widths['layer1.0.conv1']"),
    ("widths.layer1.0.conv1", 100, "dense width is 16"),           # above the family's width, below the cap
    ("widths.layer1.0.conv1", -5, "widths['layer1.0.conv1']"),
    ("dense_widths.layer1.0.conv1", 0, "dense_widths['layer1.0.conv1']"),   # widths may be 0 where a branch is removed
    ("widths.layer1.0.conv1", "8", "widths['layer1.0.conv1']"),
    ("widths.layer1.0.conv1", 8.0, "widths['layer1.0.conv1']"),
    ("widths.layer1.0.conv1", True, "widths['layer1.0.conv1']"),
    ("widths.no.such.layer", 8, "does not have"),
    ("dense_widths.layer1.0.conv1", 10**6, "dense_widths['layer1.0.conv1']"),
    ("num_classes", -1, "num_classes"),
    ("num_classes", 10**9, "num_classes"),
    ("in_channels", 10**9, "in_channels"),
    ("input_size", 0, "input_size"),
    ("model", "resnet99", "model"),
    ("bypass", "yes", "bypass"),
    ("mean", ["x"], "mean"),
    ("std", [0.0], "std"),
    ("class_names", [1, 2], "class_names"),
    ("widths", [8, 8], "widths"),
    ("extra_field", 1, "unknown field"),
]


@pytest.mark.parametrize(("key", "value", "message"), CASES)
def test_bad_spec_fields_are_refused_before_building(key: str, value: object, message: str, tmp_path: Path) -> None:
    directory = spec_dir(tmp_path / "pkg")
    payload = json.loads((directory / SLIM_SPEC).read_text())
    top, _, site = key.partition(".")
    if site and top in ("widths", "dense_widths"):
        payload[top][site] = value
    else:
        payload[key] = value
    (directory / SLIM_SPEC).write_text(json.dumps(payload))
    tracemalloc.start()
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        load_slim_model(directory)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(directory / SLIM_SPEC) in str(caught.value) and "\n" not in str(caught.value)
    assert peak < 64 << 20, peak                       # a dense ResNet-20 at most, never the declared width


def test_not_an_object_and_missing_fields(tmp_path: Path) -> None:
    directory = spec_dir(tmp_path / "pkg")
    (directory / SLIM_SPEC).write_text("[1, 2]")
    with pytest.raises(UserError, match="not an architecture spec"):
        load_slim_model(directory)
    (directory / SLIM_SPEC).write_text(json.dumps({"model": "resnet20"}))
    with pytest.raises(UserError, match="missing field"):
        load_slim_model(directory)


def test_build_from_spec_checks_widths_for_every_caller() -> None:
    with pytest.raises(UserError, match="dense width is 16"):
        build_from_spec(ArchitectureSpec("resnet20", 1, 10, 28, False, {"layer1.0.conv1": 10**9}))
