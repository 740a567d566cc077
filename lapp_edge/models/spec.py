"""The architecture spec of a (slim) model: enough to rebuild it without any training code.

A spec names the model family, its input and output sizes, whether it carries bypass
branches, and the kept width of every prunable site. `build_from_spec` builds the dense
family member and resizes it to those widths; the weights are then loaded from a plain
state dict (never a pickled module). A user's model is named by reference (`torchvision:<name>`
or `module:function`, `models/traced.py`): rebuilding it imports and calls that builder, so
load such a spec only from a source you trust (torchvision references call only torchvision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.fileio import read_json
from lapp_edge.torch_io import safe_torch_load
from lapp_edge.models.slicing import resize_to_widths
from lapp_edge.models import prunable_sites, rebuild_model

SLIM_WEIGHTS = "slim_model.pt"
SLIM_SPEC = "architecture.json"


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
    def from_dict(cls, payload: dict[str, Any]) -> "ArchitectureSpec":
        try:
            return cls(**payload)
        except TypeError as error:
            raise UserError(f"bad architecture spec: {error}") from None


def build_from_spec(spec: ArchitectureSpec) -> nn.Module:
    """The family's dense model resized to the spec's widths (random weights; load a state dict
    after). Raises UserError for an unknown family or widths naming layers it does not have."""
    model = rebuild_model(spec.model, spec.in_channels, spec.num_classes, spec.bypass, spec.coupled, input_size=spec.input_size)
    sites = prunable_sites(model)
    unknown = set(spec.widths) - {site.name for site in sites}
    if unknown:
        raise UserError(f"architecture spec names layers that {spec.model} does not have: {sorted(unknown)[:3]}")
    resize_to_widths(model, sites, spec.widths)
    return model


def load_slim_model(run_dir: str | Path) -> tuple[nn.Module, ArchitectureSpec]:
    """Rebuild a finished run's slim model (eval mode) from its spec and weights."""
    directory = Path(run_dir)
    if not (directory / SLIM_SPEC).is_file() or not (directory / SLIM_WEIGHTS).is_file():
        raise UserError(f"{directory} holds no finished model ({SLIM_SPEC} and {SLIM_WEIGHTS} are needed)")
    spec = ArchitectureSpec.from_dict(read_json(directory / SLIM_SPEC))
    model = build_from_spec(spec)
    state = safe_torch_load(directory / SLIM_WEIGHTS)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{directory / SLIM_WEIGHTS} does not match {SLIM_SPEC}: {str(error).splitlines()[0]}") from None
    return model.eval(), spec
