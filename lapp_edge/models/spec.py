"""The architecture spec of a (slim) model: enough to rebuild it without any training code.

A spec names the model family, its input and output sizes, whether it carries bypass
branches, and the kept width of every prunable site. `build_from_spec` builds the dense
family member and resizes it to those widths; the weights are then loaded from a plain
state dict (never a pickled module). A user's model is named by reference (`torchvision:<name>`
or `module:function`, `models/traced.py`): rebuilding it imports and calls that builder, so
load such a spec only from a source you trust (torchvision references call only torchvision).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.fileio import read_json_under, shown
from lapp_edge.torch_io import safe_torch_load
from lapp_edge.models.slicing import resize_to_widths
from lapp_edge.models import MODEL_BUILDERS, prunable_sites, rebuild_model

SLIM_WEIGHTS = "slim_model.pt"
SLIM_SPEC = "architecture.json"
MAX_SPEC_BYTES = 1 << 20
# What a spec may declare before anything is built from it (the dense model is allocated from
# in_channels and num_classes; widths are then bounded by the family's own dense widths).
MAX_IN_CHANNELS = 16
MAX_CLASSES = 25_000          # ImageNet-21k has 21,841
MAX_INPUT_SIZE = 1024
MAX_NAME_CHARS = 256


def _int_in(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{where} must be an integer in [{low}, {high}], not {shown(value)}")
    return value


def _check_fields(payload: dict[str, Any], where: str) -> None:
    """Types and ranges of every field a spec file declares (one line naming the file and field)."""
    model = payload["model"]
    if not isinstance(model, str) or not (model in MODEL_BUILDERS or (":" in model and len(model) <= MAX_NAME_CHARS)):
        raise UserError(f"{where}: model {shown(model)} is not one of: {', '.join(MODEL_BUILDERS)}, nor a module:function reference")
    channels = _int_in(payload["in_channels"], 1, MAX_IN_CHANNELS, f"{where}: in_channels")
    classes = _int_in(payload["num_classes"], 1, MAX_CLASSES, f"{where}: num_classes")
    _int_in(payload["input_size"], 1, MAX_INPUT_SIZE, f"{where}: input_size")
    for flag in ("bypass", "coupled"):
        if flag in payload and not isinstance(payload[flag], bool):
            raise UserError(f"{where}: {flag} must be true or false, not {shown(payload[flag])}")
    for key in ("widths", "dense_widths"):
        value = payload.get(key, {})
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must map layer names to channel counts, not {shown(value)}")
        for site, width in value.items():
            if not isinstance(site, str) or len(site) > MAX_NAME_CHARS:
                raise UserError(f"{where}: {key} has a bad layer name {shown(site)}")
            # widths may hold 0 (a removed residual branch); build_from_spec allows it only where the family does
            _int_in(width, 0 if key == "widths" else 1, 1 << 20, f"{where}: {key}[{site!r}]")
    for key in ("mean", "std"):
        value = payload.get(key, [])
        if not isinstance(value, list) or (value and len(value) != channels) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
            raise UserError(f"{where}: {key} must list one finite number per input channel ({channels}), not {shown(value)}")
    if any(v <= 0 for v in payload.get("std", [])):
        raise UserError(f"{where}: std must be positive")
    names = payload.get("class_names", [])
    if not isinstance(names, list) or (names and len(names) != classes) or any(
            not isinstance(n, str) or len(n) > MAX_NAME_CHARS for n in names):
        raise UserError(f"{where}: class_names must list num_classes ({classes}) names, not {shown(names)}")


@dataclass
class ArchitectureSpec:
    model: str
    in_channels: int
    num_classes: int
    input_size: int
    bypass: bool
    widths: dict[str, int] = field(default_factory=dict)
    dense_widths: dict[str, int] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    coupled: bool = False          # residual-coupled groups are sites (specs written before groups existed: False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, where: str = "architecture spec") -> "ArchitectureSpec":
        """A spec from parsed JSON; UserError naming `where` and the field for a missing, unknown,
        mistyped or out-of-range field. Widths are checked against the family in build_from_spec."""
        if not isinstance(payload, dict):
            raise UserError(f"{where} is not an architecture spec (a JSON object)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key)[:40] for key in payload if key not in known)
        if unknown:
            raise UserError(f"{where}: unknown field(s): {', '.join(unknown[:5])}")
        missing = [name for name in ("model", "in_channels", "num_classes", "input_size", "bypass") if name not in payload]
        if missing:
            raise UserError(f"{where}: missing field(s): {', '.join(missing)}")
        _check_fields(payload, where)
        return cls(**payload)


def build_from_spec(spec: ArchitectureSpec, where: str = "architecture spec") -> nn.Module:
    """The dense family member resized to the spec's widths. Each width must lie in
    [1, the family's dense width] (from 0 where the site is a removable residual branch) and each dense width must be the family's (UserError
    otherwise, before any slicing)."""
    if spec.model not in MODEL_BUILDERS and ":" not in spec.model:
        raise UserError(f"{where}: unknown model {shown(spec.model)}")
    _int_in(spec.in_channels, 1, MAX_IN_CHANNELS, f"{where}: in_channels")
    _int_in(spec.num_classes, 1, MAX_CLASSES, f"{where}: num_classes")
    model = rebuild_model(spec.model, spec.in_channels, spec.num_classes, spec.bypass, spec.coupled, input_size=spec.input_size)
    sites = prunable_sites(model)
    dense = {site.name: site.channels for site in sites}
    unknown = set(spec.widths) - set(dense)
    if unknown:
        raise UserError(f"{where} names layers that {spec.model} does not have: {sorted(unknown)[:3]}")
    removable = {site.name for site in sites if site.removal is not None}
    for name, width in spec.widths.items():
        # 0: a removed residual branch (--block-removal), where the family allows it
        _int_in(width, 0 if name in removable else 1, dense[name], f"{where}: widths[{name!r}] (the family's dense width is {dense[name]})")
    for name, width in spec.dense_widths.items():
        if dense.get(name) != width:
            raise UserError(f"{where}: dense_widths[{name!r}] is {shown(width)}; {spec.model} has {dense.get(name)} there")
    resize_to_widths(model, sites, spec.widths)
    return model


def load_slim_model(run_dir: str | Path) -> tuple[nn.Module, ArchitectureSpec]:
    """Rebuild a finished run's slim model (eval mode) from its spec and weights (a run or a
    package directory; both files are read without following links)."""
    directory = Path(run_dir)
    if not os.path.lexists(directory / SLIM_SPEC) or not os.path.lexists(directory / SLIM_WEIGHTS):
        raise UserError(f"{directory} holds no finished model ({SLIM_SPEC} and {SLIM_WEIGHTS} are needed)")
    where = str(directory / SLIM_SPEC)
    spec = ArchitectureSpec.from_dict(read_json_under(directory, SLIM_SPEC, MAX_SPEC_BYTES), where)
    model = build_from_spec(spec, where)
    state = safe_torch_load(SLIM_WEIGHTS, root=directory)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{directory / SLIM_WEIGHTS} does not match {SLIM_SPEC}: {str(error).splitlines()[0]}") from None
    return model.eval(), spec
