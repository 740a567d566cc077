"""Python API for your own model ("bring your own model", docs/BYOM.md).

    net = lapp_ready(model, example_input)           # traced coupled groups, ConvBN units (models/traced.py)
    pruner = Pruner(net, flops_target=0.5, prune_steps=200)
    for x, y in batches:                              # your loop: masks are set before each forward
        loss = pruner.penalize(F.cross_entropy(net(x), y))
        optimizer.zero_grad(); loss.backward(); optimizer.step(); pruner.step()
    pruner.freeze(optimizer)                          # round widths to the target, slice channels
    export(net, "model.onnx")                         # fuse BN + bypass, ONNX, checked against ONNX Runtime

Or train with the project's Trainer from the command line: `lapp-edge train --model
torchvision:mobilenet_v3_small` or `--model mypkg.nets:build`. Every failure on bad input is a
`lapp_edge.errors.UserError` subclass with a one-line message.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.models.traced import (
    ExampleInputError, ModelReferenceError, NoPrunableLayerError, TracedModel, UnprunableLayersWarning,
    UntraceableModelError, UserModelError, build_reference, lapp_ready,
)

__all__ = [
    "ExampleInputError", "ExportError", "ExportResult", "ModelReferenceError", "NoPrunableLayerError", "Pruner",
    "TargetUnreachableError", "TracedModel", "UnprunableLayersWarning", "UntraceableModelError", "UserModelError",
    "build", "export", "lapp_ready", "load", "save",
]


class TargetUnreachableError(UserError):
    """The FLOPs target lies below what the network costs with every prunable layer at its minimum width."""


class ExportError(UserError):
    """The exported ONNX model does not match the PyTorch model."""


def build(reference: str, num_classes: int, input_shape: tuple[int, int, int], *, bypass: bool = True,
          coupled: bool = True) -> TracedModel:
    """The model a reference names (`torchvision:<name>` or `module:function`), LAPP-ready at
    `input_shape` (C, H, W with H == W). Such a model can be saved as a spec and rebuilt (`save`, `load`)."""
    channels, height, width = input_shape
    if height != width:
        raise ExampleInputError(f"specs describe square inputs; got {height} x {width} (use lapp_ready directly)")
    return build_reference(reference, channels, num_classes, height, bypass, coupled)


class Pruner:
    """LAPP in your own training loop: learnable thresholds, masks set before every forward of
    `model` (a forward pre-hook), the FLOPs penalty, and the freeze that slims the model.

    model:          a LAPP-ready model (`lapp_ready`, `build`, or a registry family)
    flops_target:   kept share of the dense FLOPs, in (0, 1]; the slim model lands within +-1%
    prune_steps:    training steps of the pruning phase (the target anneals over 75% of them)
    input_shape:    (C, H, W) the FLOPs are counted at (default: what the model was traced at)
    channel_multiple: kept widths are multiples of this (1: no rounding)
    max_pruning_ratio: each prunable layer or coupled group keeps at least ceil((1 - this) * its channels),
                    in (0, 1] (1: at least one channel multiple; the CLI's --max-pruning-ratio)

    Raises TargetUnreachableError when the target is below the FLOPs of the network with every
    prunable layer at its minimum width (the unprunable layers' cost is a floor)."""

    def __init__(self, model: nn.Module, flops_target: float, prune_steps: int, *, input_shape: tuple[int, int, int] | None = None,
                 channel_multiple: int = 8, scorer: str = "bn_weight_norm", group_reduce: str = "sum",
                 max_pruning_ratio: float = 1.0) -> None:
        from lapp_edge.lapp.controller import LappConfig, LappController, site_min_widths
        from lapp_edge.lapp.flops import build_flops_cost
        from lapp_edge.lapp.widths import smallest_cost_ratio
        from lapp_edge.models import prunable_sites
        from lapp_edge.training.run_dir import RunState
        from lapp_edge.training.task import LappTask

        if not (0.0 < flops_target <= 1.0):
            raise UserError(f"flops_target must lie in (0, 1], got {flops_target}")
        if prune_steps < 1:
            raise UserError(f"prune_steps must be at least 1, got {prune_steps}")
        if channel_multiple < 1:
            raise UserError(f"channel_multiple must be at least 1, got {channel_multiple}")
        if not 0.0 < max_pruning_ratio <= 1.0:
            raise UserError(f"max_pruning_ratio must lie in (0, 1], got {max_pruning_ratio}")
        shape = input_shape or getattr(model, "input_shape", None)
        if shape is None:
            raise UserError("input_shape (C, H, W) is needed to count FLOPs")
        self.model = model
        self.input_shape = tuple(int(s) for s in shape)
        self.sites = prunable_sites(model)
        self.cost = build_flops_cost(model, self.sites, self.input_shape)  # type: ignore[arg-type]
        self.config = LappConfig(target=flops_target, channel_multiple=channel_multiple, scorer=scorer,
                                 min_channels=max(1, channel_multiple), group_reduce=group_reduce,
                                 max_pruning_ratio=max_pruning_ratio)
        floor = smallest_cost_ratio(self.cost, channel_multiple, site_min_widths(self.sites, self.config))
        if floor > flops_target + self.config.tolerance:
            unprunable = len(getattr(model, "unprunable", {}))
            also = f"; its {unprunable} unprunable conv layer(s) stay at full width" if unprunable else ""
            raise TargetUnreachableError(
                f"FLOPs target {flops_target} cannot be reached: with every prunable layer at its minimum width "
                f"({self.config.minimum_words('max_pruning_ratio')}) the network keeps {floor:.3f} of its FLOPs{also}")
        device = next(model.parameters()).device
        self.controller = LappController(self.sites, self.cost, self.config).to(device)
        self.task = LappTask(self.controller, prune_steps, trace_every=max(1, prune_steps))
        self.state = RunState(phase="pruning", widths={s.name: s.channels for s in self.sites})
        self.steps = 0
        self.frozen = False
        self._hook = model.register_forward_pre_hook(self._set_masks)

    def _set_masks(self, module: nn.Module, args: Any) -> None:
        # training forward with autograd: straight-through masks; evaluation: the hard masks
        self.controller.update_masks(with_grad=module.training and torch.is_grad_enabled())

    def penalize(self, task_loss: torch.Tensor) -> torch.Tensor:
        """`task_loss` + penalty_weight * |FLOPs ratio of the current masks - target(step)|."""
        return self.task.loss(task_loss, self.steps)

    def step(self) -> None:
        """After your optimizer's step: one Adam step on the thresholds (then their gradients are cleared)."""
        self.task.after_step(self.steps, self.state)
        self.task.zero_grad()
        self.steps += 1

    def flops_ratio(self) -> float:
        """FLOPs of the network with the current hard masks, over the dense FLOPs."""
        counts = torch.tensor(self.controller.hard_counts(), dtype=torch.float64)
        return float(self.cost.ratio(counts))

    def freeze(self, optimizer: torch.optim.Optimizer | None = None,
               calibration_batches: Iterable[torch.Tensor] | None = None) -> dict[str, int]:
        """End of pruning: round widths onto the target (within +-1%), slice every pruned channel
        out of the model (and out of `optimizer`'s state), detach the masks. With
        `calibration_batches` (input tensors), BatchNorm statistics are re-estimated on them.
        Returns the kept width of every site."""
        from lapp_edge.lapp.freeze import freeze

        plan = freeze(self.controller, optimizer)
        self._hook.remove()
        self.frozen = True
        if calibration_batches is not None:
            recalibrate_batchnorm(self.model, calibration_batches)
        return dict(plan.widths)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics (cumulative average over `batches`)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    device = next(model.parameters()).device
    for images in batches:
        model(images.to(device))
    for norm, momentum in zip(norms, saved):
        norm.momentum = momentum
    model.train(was_training)


@dataclass
class ExportResult:
    path: str
    max_abs_diff: float          # ONNX Runtime vs the PyTorch eval model, over the check inputs
    logit_scale: float           # max |logit| of the PyTorch model (>= 1): the tolerance is relative to it
    op_counts: dict[str, int]


def export(model: nn.Module, path: str | Path, *, input_shape: tuple[int, int, int] | None = None,
           tolerance: float = 1e-4, check_inputs: torch.Tensor | None = None) -> ExportResult:
    """Fuse (BN and bypass folded), export to ONNX (opset 18, dynamic batch, "input" -> "logits")
    and check it with ONNX Runtime against the PyTorch model in eval mode: max |diff| <= tolerance
    x max(1, max |logit|) on `check_inputs` (default: 8 seeded random inputs). The file is written
    (atomically) only when the check passes; ExportError otherwise."""
    from lapp_edge.export.onnx import check_graph, export_onnx
    from lapp_edge.export.verify import ort_session
    from lapp_edge.fileio import atomic_write_bytes
    from lapp_edge.models.fuse import fuse_model

    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise UserError("input_shape (C, H, W) is needed to export")
    shape = tuple(int(s) for s in shape)
    reference = copy.deepcopy(model).cpu().eval()      # the caller's model keeps its device and mode
    fused = fuse_model(reference)
    data = export_onnx(fused, shape)  # type: ignore[arg-type]
    graph = check_graph(data, fused)
    if graph.problem():
        raise ExportError(f"the exported graph is not fully fused: {graph.problem()}")
    inputs = check_inputs if check_inputs is not None else torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(inputs.float()).numpy()
    session = ort_session(data)
    got = session.run(None, {session.get_inputs()[0].name: inputs.float().numpy()})[0]
    diff = float(abs(got - expected).max())
    scale = max(1.0, float(abs(expected).max()))
    if not diff <= tolerance * scale:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diff:.3g} (tolerance {tolerance} x {scale:.3g}); nothing written")
    atomic_write_bytes(path, data)
    return ExportResult(str(path), diff, scale, graph.op_counts)


def save(model: TracedModel, directory: str | Path, *, num_classes: int | None = None) -> Path:
    """Write `architecture.json` (the model's reference and site widths) and `slim_model.pt` (a plain
    state dict) into `directory`, as a training run does; `load` (or `lapp-edge export`'s
    loader) rebuilds it. Only for models built from a reference (`build`, or `lapp_ready(...,
    source="module:function")`): the spec rebuilds by calling that builder."""
    from lapp_edge.fileio import atomic_write_json
    from lapp_edge.models import prunable_sites
    from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec
    from lapp_edge.torch_io import atomic_torch_save

    if not isinstance(model, TracedModel) or model.source is None:
        raise UserModelError("only a model built from a reference (torchvision:<name> or module:function) can be saved as a "
                             "spec; pass source='module:function' to lapp_ready, or keep your builder and reload with "
                             "lapp_ready + resize_to_widths + load_state_dict (docs/BYOM.md)")
    channels, height, width = model.input_shape
    if height != width:
        raise UserModelError(f"specs describe square inputs; this model was traced at {height} x {width}")
    classes = num_classes if num_classes is not None else _output_classes(model)
    spec = ArchitectureSpec(
        model=model.source, in_channels=channels, num_classes=classes, input_size=height, bypass=model.bypass,
        widths={site.name: site.channels for site in prunable_sites(model)}, dense_widths=dict(model.dense_widths),
        coupled=model.coupled,
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(out / SLIM_WEIGHTS, state)
    atomic_write_json(out / SLIM_SPEC, spec.to_dict())
    return out


def _output_classes(model: TracedModel) -> int:
    was_training = model.training
    device = next(model.parameters()).device
    with torch.no_grad():
        classes = int(model.eval()(torch.zeros(1, *model.input_shape, device=device)).shape[1])
    model.train(was_training)
    return classes


def load(directory: str | Path) -> nn.Module:
    """The slim model `save` (or a training run) wrote into `directory`, in eval mode."""
    from lapp_edge.models.spec import load_slim_model

    return load_slim_model(directory)[0]
