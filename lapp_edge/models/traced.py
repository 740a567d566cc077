"""A user's own model made LAPP-ready: coupled-channel groups found by tracing.

`lapp_ready(model, example_input)` takes any nn.Module (a torchvision model, or one the user
wrote) and returns a `TracedModel` wrapping it:

1. The model is run once on the example input (a wrong shape fails here, in one line).
2. Torch-Pruning's `DependencyGraph` traces it through autograd and groups every channel
   that must be removed together (`get_all_groups`, one group per set of coupled channels).
3. Every Conv2d whose only user is a BatchNorm2d becomes a `ConvBN` (conv=..., bn=..., the BN
   slot an Identity; as `torchvision_resnet._wrap`), so the mask and the folding work as for
   the built-in families.
4. Each group is mapped onto a `PrunableSite` or left unprunable:
   - producers: the ConvBNs in the group (several where residual adds sum them);
   - followers: depthwise ConvBNs (in == out == groups) the channels run through one to one;
   - gates: convs / linears without BN whose output only multiplies the channels
     (squeeze-excitation's expanding layer); their output channels are sliced, never masked;
   - consumers: convs (groups 1) and linears reading the channels as their whole input
     (SE's squeezing layer, the next block, the classifier).
   A group is left unprunable when it holds a concatenation, a split or slice, a grouped
   (non-depthwise) conv, a BatchNorm not right after a conv, a conv without BN that is not a
   gate, another layer type with per-channel state, the model's output, a module called more
   than once, or a linear layer reading a flattened spatial map. Concatenation is not
   mapped onto channel ranges in this version (DenseNet's growth convs stay at full width).
5. A numerical check then proves every site: with random masks on all sites the masked
   network must equal the physically sliced one (random BN statistics, eval mode). A site
   that fails (an activation with f(0) != 0 after it, an add of an unmasked tensor that the
   autograd trace cannot see, such as the network input) is left unprunable too, and the
   ConvBN wrapping itself is checked to change no output.
6. Every producer whose kernel is square and odd with 'same' padding (k // 2), dilation 1
   and zero padding mode gets the 1x1 bypass branch (any stride); other producers are
   pruned without one.

Every conv whose output channels stay at full width is named in ONE warning line
(`UnprunableLayersWarning`), grouped by reason: never silently wrong, never silently skipped.

**Why Torch-Pruning.** Its DependencyGraph is a maintained, widely used tracer that already
models channel coupling through residual adds, concatenation and split (with index mapping),
depthwise and grouped convs, reshape/flatten into linear layers and unknown element-wise ops,
and is exercised upstream on the torchvision zoo. torch.fx would give the graph but not the
coupling: every op's channel semantics would be ours to write and keep right, and
`symbolic_trace` refuses data-dependent control flow that an autograd trace (one real forward
pass) handles. We use only the graph and its groups, never Torch-Pruning's pruners: slicing,
masks and costs stay the project's own, so a traced model is the same kind of object as a
built-in family (ConvBN units, PrunableSites, specs by site name).

**Rebuilding.** A `TracedModel` remembers where it came from (`source`): a torchvision name
(`torchvision:mobilenet_v3_small`) or an importable `module:function` returning the model
(called with `num_classes` / `in_channels` when it accepts them). An architecture spec stores
that reference and the site widths, and `build_model` rebuilds it by calling the builder and
tracing again at the spec's input size (the trace is deterministic: same sites, same names).
A model built in Python with no importable builder can be trained, slimmed and exported
(ONNX) all the same, but not saved as a spec; rebuild it by calling `lapp_ready` on a fresh
instance, `resize_to_widths` and `load_state_dict` (docs/BYOM.md).
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lapp_edge.errors import UserError
from lapp_edge.models.slicing import slim_site
from lapp_edge.models.units import ConvBN, PrunableSite

TORCHVISION_PREFIX = "torchvision:"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*$")
CHECK_TOLERANCE = 1e-4        # masked vs sliced, relative to the logit scale, float32


class UserModelError(UserError):
    """A user's model (or the reference naming it) cannot be made LAPP-ready."""


class ModelReferenceError(UserModelError):
    """`module:function` or `torchvision:name` does not name a builder that returns an nn.Module."""


class ExampleInputError(UserModelError):
    """The model does not run on the example input (wrong shape, wrong type)."""


class UntraceableModelError(UserModelError):
    """The model's forward cannot be traced through autograd."""


class NoPrunableLayerError(UserModelError):
    """Tracing found no conv LAPP can prune."""


class UnprunableLayersWarning(UserWarning):
    """Some conv layers stay at full width (named, with the reason, in one line)."""


# --- references: torchvision:name and module:function -------------------------------------------

def is_reference(name: str) -> bool:
    """True for a model named by reference (`torchvision:name`, `module:function`), not by registry name."""
    return ":" in name


def _look_in_working_directory(top_level: str) -> None:
    """`lapp-edge` is a console script, so unlike `python -m` the working directory is not on sys.path:
    put it there (last) when the reference's top-level module is not importable otherwise and the working
    directory holds it, and only then (an empty folder there would otherwise shadow missing optional
    packages, such as tensorrt, for the whole process)."""
    here = os.getcwd()
    try:
        if here in sys.path or importlib.util.find_spec(top_level) is not None:
            return
    except (ImportError, ValueError):
        return
    if importlib.machinery.PathFinder.find_spec(top_level, [here]) is not None:
        sys.path.append(here)


def resolve_builder(reference: str) -> Callable[..., Any]:
    """The builder a reference names (imported; not called). ModelReferenceError otherwise.

    Only Python functions and classes are accepted (not builtins), and no private names:
    a reference in a spec file should name a model builder, not an arbitrary callable."""
    if reference.startswith(TORCHVISION_PREFIX):
        name = reference[len(TORCHVISION_PREFIX):]
        import torchvision.models

        try:
            return torchvision.models.get_model_builder(name)
        except ValueError:
            raise ModelReferenceError(f"unknown torchvision model '{name}' (see torchvision.models.list_models())") from None
    if not _REFERENCE.match(reference):
        raise ModelReferenceError(f"model reference '{reference}' is not of the form module:function (e.g. mypkg.nets:build)")
    module_name, _, attribute = reference.partition(":")
    if any(part.startswith("_") for part in attribute.split(".")):
        raise ModelReferenceError(f"model reference '{reference}' names a private attribute")
    _look_in_working_directory(module_name.partition(".")[0])
    try:
        target: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - any import failure is the user's, in one line
        raise ModelReferenceError(f"cannot import module '{module_name}' for --model {reference}: {_first_line(error)}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelReferenceError(f"module '{module_name}' has no '{attribute}' (--model {reference})")
        target = getattr(target, part)
    if not (inspect.isfunction(target) or inspect.isclass(target)):
        raise ModelReferenceError(f"{reference} is not a Python function or class returning an nn.Module")
    return target


def _accepts(builder: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """A torchvision model for `in_channels` != 3: its first conv (the stem) reads `in_channels`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            replacement = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, 1, module.bias is not None, module.padding_mode,
            )
            nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            return


def call_builder(reference: str, in_channels: int, num_classes: int) -> nn.Module:
    """Call the builder a reference names: torchvision ones with weights=None and num_classes (their
    stem conv re-made for in_channels != 3); others with num_classes / in_channels where accepted."""
    builder = resolve_builder(reference)
    kwargs: dict[str, Any] = {}
    torchvision_model = reference.startswith(TORCHVISION_PREFIX)
    if torchvision_model:
        kwargs = {"weights": None, "num_classes": num_classes}
    else:
        if _accepts(builder, "num_classes"):
            kwargs["num_classes"] = num_classes
        if _accepts(builder, "in_channels"):
            kwargs["in_channels"] = in_channels
    try:
        model = builder(**kwargs)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's builder failed (or called sys.exit): one line
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelReferenceError(f"{reference}({shown}) failed: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ModelReferenceError(f"{reference} returned {type(model).__name__}, not an nn.Module")
    if torchvision_model and in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


def build_reference(reference: str, in_channels: int, num_classes: int, input_size: int | None,
                    bypass: bool = False, coupled: bool = True) -> "TracedModel":
    """The model a reference names, built and made LAPP-ready at input (1, in_channels, input_size, input_size)."""
    if input_size is None:
        raise UserModelError(f"{reference} is traced to find its prunable layers, which needs the input size")
    model = call_builder(reference, in_channels, num_classes)
    example = torch.zeros(1, in_channels, input_size, input_size)
    traced = lapp_ready(model, example, bypass=bypass, coupled=coupled, source=reference)
    check_class_count(traced, example, num_classes, reference)
    return traced


def check_class_count(model: nn.Module, example: torch.Tensor, num_classes: int, source: str) -> None:
    """Raise UserModelError unless `model` maps `example` (N, C, H, W) to logits of shape (N, num_classes):
    a model with fewer outputs than the dataset has classes fails in the first training step, one with
    more trains and ships a classifier whose extra outputs name no class. Runs one eval-mode forward."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(example)
    finally:
        model.train(was_training)
    wanted = (example.shape[0], num_classes)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != wanted:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserModelError(f"{source} outputs {got} for an input of shape {tuple(example.shape)}, but the dataset has "
                             f"{num_classes} classes: it must output logits of shape {wanted} (its builder is given "
                             f"num_classes={num_classes} when it takes that argument)")


# --- the traced model ---------------------------------------------------------------------------

@dataclass
class SiteLayout:
    """A prunable site by module paths (relative to the TracedModel), resolved by `prunable_sites`."""

    name: str
    producers: list[str]
    followers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)


class TracedModel(nn.Module):
    """A user's model (`net`) with its convs wrapped as ConvBN and its coupled groups as sites.

    source:      the reference it was built from (None for a module given in Python)
    input_shape: (C, H, W) it was traced at
    unprunable:  conv path -> why its output channels stay at full width
    dense_widths: site name -> channels when it was made LAPP-ready (for specs)
    """

    def __init__(self, net: nn.Module, layouts: list[SiteLayout], unprunable: dict[str, str],
                 source: str | None, input_shape: tuple[int, int, int], coupled: bool = True) -> None:
        super().__init__()
        self.net = net
        self.site_layouts = layouts
        self.unprunable = unprunable
        self.source = source
        self.input_shape = input_shape
        self.coupled = coupled
        self.bypass = False                  # lapp_ready's bypass flag (what a spec rebuilds with)
        self.dense_widths: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prunable_sites(self) -> list[PrunableSite]:
        get = self.get_submodule
        return [
            PrunableSite(layout.name, [get(p) for p in layout.producers], [get(p) for p in layout.followers],
                         [get(p) for p in layout.consumers], [get(p) for p in layout.gates])
            for layout in self.site_layouts
        ]


# --- tracing and grouping -----------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def bypass_compatible(conv: nn.Conv2d) -> bool:
    """A parallel 1x1 conv (same stride, no padding) reads exactly the kxk kernel's centre tap."""
    k = conv.kernel_size
    return (k[0] == k[1] and k[0] % 2 == 1 and not isinstance(conv.padding, str) and tuple(conv.padding) == (k[0] // 2,) * 2
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


def _wrappable_bn(bn: nn.Module, conv: nn.Conv2d) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.num_features == conv.out_channels
            and conv.padding_mode == "zeros")


@dataclass
class _Analysis:
    output: torch.Tensor                    # the model's output on the example, before wrapping
    pairs: dict[str, str]                  # conv path -> the BatchNorm path wrapped with it
    layouts: list[SiteLayout]               # paths relative to the user's model
    unprunable: dict[str, str]              # conv path -> reason


def _run_once(model: nn.Module, example: torch.Tensor) -> tuple[torch.Tensor, list[str], Counter[str]]:
    """Run the model on the example (no grad, eval): its output, the convs in execution order and
    how often each conv / BN / linear was called. ExampleInputError when the forward fails."""
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []
    calls: Counter[str] = Counter()

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[names[module]] += 1
        if isinstance(module, nn.Conv2d) and calls[names[module]] == 1:
            order.append(names[module])

    watched = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    handles = [m.register_forward_hook(record) for m in watched]
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as error:  # noqa: BLE001 - a wrong shape (or any failure) is reported in one line
        raise ExampleInputError(
            f"the model does not run on an example input of shape {tuple(example.shape)}: {type(error).__name__}: "
            f"{_first_line(error)}") from None
    finally:
        for handle in handles:
            handle.remove()
    if not torch.is_tensor(output) or output.dim() != 2:
        shown = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
        raise UserModelError(f"the model must return one tensor of logits (batch x classes), got {shown}")
    return output, order, calls


def _dependency_graph(model: nn.Module, example: torch.Tensor) -> Any:
    import torch_pruning as tp

    graph = tp.DependencyGraph()
    leaf = example.detach().clone().requires_grad_(True)   # every op gets a grad_fn, even with frozen weights
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph.build_dependency(model, example_inputs=(leaf,), verbose=False)
    except Exception as error:  # noqa: BLE001
        raise UntraceableModelError(f"the model's forward cannot be traced through autograd: {type(error).__name__}: "
                                    f"{_first_line(error)}") from None
    return graph


def _gate_reaches_only_multiplications(node: Any, ops: Any) -> bool:
    """True when every path from a gate's node runs through unary element-wise ops (or reshapes)
    into a multiplication: its output only scales other channels."""
    stack, seen = list(node.outputs), set()
    if not stack:
        return False
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.type == ops.OPTYPE.ELEMENTWISE and str(getattr(current.module, "_grad_fn", "")).startswith("Mul"):
            continue
        if current.type in (ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE) and len(current.inputs) == 1 and current.outputs:
            stack.extend(current.outputs)
            continue
        return False
    return True


INDEX_MAPPING = "a channel index mapping"     # a symptom seen on every layer a flatten or concat re-indexes


def _ranked(reasons: list[str]) -> list[str]:
    """A group's distinct reasons, the specific ones first in the order the group meets them (from its
    root conv outwards), the generic index mapping last: the first is the one a warning names."""
    distinct = list(dict.fromkeys(reasons))
    return [r for r in distinct if r != INDEX_MAPPING] + [r for r in distinct if r == INDEX_MAPPING]


def _classify_group(group: Any, graph: Any, pairs: dict[str, str], names: dict[nn.Module, str], reused: set[str],
                    coupled: bool) -> tuple[SiteLayout | None, list[str], list[str]]:
    """One Torch-Pruning group -> (layout or None, its conv paths, the reasons it cannot be a site)."""
    ops = graph.ops
    wrapped_bns = set(pairs.values())
    root = group[0].dep.target.module
    channels = root.out_channels
    full = list(range(channels))
    producers, followers, consumers, gates, convs = [], [], [], [], []
    reasons: list[str] = []
    has_add = False
    for item in group:
        dep, idxs = item.dep, item.idxs
        node, module = dep.target, dep.target.module
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        kind = node.type
        if kind == ops.OPTYPE.CONCAT:
            reasons.append("concatenation")
        elif kind in (ops.OPTYPE.SPLIT, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
            reasons.append("a split or slice of the channels")
        elif kind == ops.OPTYPE.OUTPUT:
            reasons.append("the model's output")
        elif kind in (ops.OPTYPE.PARAMETER, ops.OPTYPE.CUSTOMIZED):
            reasons.append("a parameter outside any layer")
        elif kind == ops.OPTYPE.ELEMENTWISE:
            has_add = has_add or str(getattr(module, "_grad_fn", "")).startswith("Add")
        elif kind == ops.OPTYPE.RESHAPE:
            pass
        elif isinstance(module, nn.Conv2d):
            path = names[module]
            if is_out:
                convs.append(path)
            if list(idxs) != full:
                reasons.append(INDEX_MAPPING)
            elif path in reused:
                reasons.append("a layer called more than once")
            elif _is_depthwise(module):
                if path not in pairs:
                    reasons.append("a depthwise conv without BatchNorm")
                elif is_out:
                    followers.append(path)
            elif module.groups > 1:
                reasons.append("a grouped conv")
            elif is_out:
                if path in pairs:
                    producers.append(path)
                elif _gate_reaches_only_multiplications(node, ops):
                    gates.append(path)
                else:
                    reasons.append("no BatchNorm after the conv")
            else:
                consumers.append(path)
        elif isinstance(module, nn.Linear):
            path = names[module]
            if list(idxs) != full or (not is_out and module.in_features != channels):
                reasons.append("a flattened spatial map")
            elif path in reused:
                reasons.append("a layer called more than once")
            elif is_out:
                if _gate_reaches_only_multiplications(node, ops):
                    gates.append(path)
                else:
                    reasons.append("a linear layer's outputs")
            else:
                consumers.append(path)
        elif isinstance(module, nn.BatchNorm2d):
            if names.get(module) not in wrapped_bns:
                reasons.append("a BatchNorm not right after a conv")
            elif list(idxs) != full:             # a right-placed BN mapped by what follows (a flatten, a concat)
                reasons.append(INDEX_MAPPING)
        else:
            reasons.append(f"a {type(module).__name__} layer")
    if not producers and not reasons:
        reasons.append("no BatchNorm after the conv")
    if len(producers) > 1 and not coupled:
        reasons.append("residual-coupled channels (coupled groups are off)")
    if reasons:
        return None, convs, _ranked(reasons)
    unique = lambda paths: list(dict.fromkeys(paths))  # noqa: E731
    # named after its first producer in forward order once sorted (`_analyse`); the suffix marks a coupled group
    suffix = "" if len(producers) == 1 else (".residual" if has_add else ".coupled")
    return SiteLayout(suffix, unique(producers), unique(followers), unique(consumers), unique(gates)), convs, []


def _analyse(model: nn.Module, example: torch.Tensor, coupled: bool) -> _Analysis:
    output, order, calls = _run_once(model, example)
    if not order:
        raise NoPrunableLayerError("the model has no Conv2d layer on its forward path: nothing for LAPP to prune")
    graph = _dependency_graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    traced = {names[m] for m in graph.module2node if isinstance(m, nn.Module) and m in names}
    missing = [path for path in order if path not in traced]
    if missing:
        raise UntraceableModelError(
            f"the model's forward cannot be traced through autograd: {len(missing)} conv(s) ran but do not reach its output "
            f"({', '.join(missing[:3])}); a detach, torch.no_grad or numpy round trip in forward breaks the trace")
    reused = {path for path, count in calls.items() if count > 1}
    pairs: dict[str, str] = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Conv2d) or names.get(module) in reused or len(node.outputs) != 1:
            continue
        after = node.outputs[0]
        bn = after.module
        if (isinstance(bn, nn.Module) and _wrappable_bn(bn, module) and names.get(bn) not in reused
                and len(after.inputs) == 1 and after.inputs[0] is node):
            pairs[names[module]] = names[bn]

    position = {path: index for index, path in enumerate(order)}
    layouts: list[SiteLayout] = []
    unprunable: dict[str, str] = {}
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d,)):
        layout, convs, reasons = _classify_group(group, graph, pairs, names, reused, coupled)
        if layout is None:
            for path in convs:
                unprunable.setdefault(path, reasons[0] if "concatenation" not in reasons else "concatenation")
            continue
        layouts.append(layout)
    for layout in layouts:
        for paths in (layout.producers, layout.followers, layout.consumers, layout.gates):
            paths.sort(key=lambda p: position.get(p, len(position)))
        layout.name = layout.producers[0] + layout.name
    layouts.sort(key=lambda layout: position.get(layout.producers[0], len(position)))
    unprunable = {path: unprunable[path] for path in sorted(unprunable, key=lambda p: position.get(p, len(position)))}
    return _Analysis(output, pairs, layouts, unprunable)


# --- wrapping and checks ------------------------------------------------------------------------

def _prefixed(layout: SiteLayout, prefix: str) -> SiteLayout:
    add = lambda paths: [prefix + p for p in paths]  # noqa: E731
    return SiteLayout(prefix + layout.name, add(layout.producers), add(layout.followers), add(layout.consumers),
                      add(layout.gates))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affines, so a channel that should be zero and is not shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_((torch.rand(n, generator=generator) - 0.5) * 0.4)
                if module.track_running_stats:
                    module.running_mean.copy_((torch.rand(n, generator=generator) - 0.5) * 0.4)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def _outputs_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(a.abs().max().clamp(min=1.0))
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) / scale <= CHECK_TOLERANCE


def _masked_equals_sliced(model: "TracedModel", x: torch.Tensor, indices: list[int], generator: torch.Generator) -> bool:
    """Random keeps on the given sites: masked forward == forward after slicing them."""
    sites = model.prunable_sites()
    keeps = {}
    for index in indices:
        site = sites[index]
        width = max(1, site.channels // 2)
        keeps[index] = torch.randperm(site.channels, generator=generator)[:width].sort().values
        mask = torch.zeros(site.channels, device=x.device)
        mask[keeps[index].to(x.device)] = 1.0
        for unit in site.units:
            unit.channel_mask = mask
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for site in sites:
            for unit in site.units:
                unit.channel_mask = None
    sliced = copy.deepcopy(model)
    sliced_sites = sliced.prunable_sites()
    try:
        for index, keep in keeps.items():
            slim_site(sliced_sites[index], keep)
        with torch.no_grad():
            return _outputs_match(masked, sliced(x))
    except (RuntimeError, ValueError, TypeError):   # a shape the trace did not see (an add of the network input)
        return False


def _inexact_sites(model: "TracedModel", example: torch.Tensor) -> list[int]:
    """Indices of sites whose masked network differs from the sliced one (none in the usual case:
    one check of all sites at once; one check per site only when that fails)."""
    probe = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    _randomize_batchnorm(probe, generator)
    x = torch.randn(2, *example.shape[1:], generator=generator).to(example.device)
    count = len(probe.site_layouts)
    if count == 0 or _masked_equals_sliced(probe, x, list(range(count)), torch.Generator().manual_seed(1)):
        return []
    return [i for i in range(count) if not _masked_equals_sliced(probe, x, [i], torch.Generator().manual_seed(1))]


def _warning_line(unprunable: dict[str, str], model_name: str) -> str:
    by_reason: dict[str, list[str]] = {}
    for path, reason in unprunable.items():
        by_reason.setdefault(reason, []).append(path)
    parts = "; ".join(f"{reason}: {', '.join(paths)}" for reason, paths in by_reason.items())
    return f"{len(unprunable)} conv layer(s) of {model_name} stay at full width (LAPP cannot prune them): {parts}"


def lapp_ready(model: nn.Module, example_input: torch.Tensor, *, bypass: bool = True, coupled: bool = True,
               source: str | None = None) -> TracedModel:
    """`model` made LAPP-ready (see the module docstring): its convs wrapped in place as ConvBN,
    returned inside a TracedModel whose `prunable_sites()` are the traced coupled groups.

    bypass:  add the 1x1 bypass branch to every prunable conv that allows one
    coupled: make residual-coupled groups prunable (False: single-producer sites only)
    source:  the reference (`module:function` / `torchvision:name`) that rebuilds the model, for specs

    Raises ExampleInputError, UntraceableModelError, NoPrunableLayerError (UserError subclasses);
    warns (UnprunableLayersWarning, one line) naming every conv that stays at full width."""
    if not isinstance(model, nn.Module):
        raise UserModelError(f"expected an nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(example_input) or example_input.dim() != 4 or not example_input.is_floating_point():
        shown = tuple(example_input.shape) if torch.is_tensor(example_input) else type(example_input).__name__
        raise ExampleInputError(f"the example input must be a float tensor N x C x H x W, got {shown}")
    if isinstance(model, TracedModel):
        raise UserModelError("the model is already LAPP-ready")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example_input.detach()[:1].to(device)
    was_training = model.training
    model.eval()
    try:
        analysis = _analyse(model, example, coupled)
    finally:
        model.train(was_training)
    model.eval()
    model_name = source or type(model).__name__

    for conv_path, bn_path in analysis.pairs.items():
        unit = ConvBN(0, 0, 0, conv=model.get_submodule(conv_path), bn=model.get_submodule(bn_path))
        _set_module(model, bn_path, nn.Identity())
        _set_module(model, conv_path, unit)
    traced = TracedModel(model, [_prefixed(layout, "net.") for layout in analysis.layouts],
                         {f"net.{path}": reason for path, reason in analysis.unprunable.items()},
                         source, tuple(int(s) for s in example.shape[1:]), coupled)  # type: ignore[arg-type]
    traced.eval()
    with torch.no_grad():
        if not _outputs_match(analysis.output, traced(example)):
            raise UntraceableModelError("wrapping each conv with its BatchNorm changed the model's output: the traced "
                                        "graph does not describe this forward (data-dependent layers?)")
    inexact = _inexact_sites(traced, example)
    if inexact:
        failing = [traced.site_layouts[i] for i in inexact]
        for layout in failing:
            for path in [*layout.producers, *layout.followers, *layout.gates]:
                traced.unprunable[path] = "masked channels do not stay zero after it"
        traced.site_layouts = [layout for i, layout in enumerate(traced.site_layouts) if i not in set(inexact)]
    if not traced.site_layouts:
        reasons = sorted(set(traced.unprunable.values()))
        raise NoPrunableLayerError(f"{model_name} has no conv LAPP can prune ({'; '.join(reasons) or 'no conv followed by BatchNorm'})")
    if bypass:
        for layout in traced.site_layouts:
            for path in layout.producers:
                unit = traced.get_submodule(path)
                if unit.bypass_conv is None and bypass_compatible(unit.conv):
                    with_bypass = ConvBN(0, 0, 0, conv=unit.conv, bn=unit.bn, bypass=True).to(device)
                    assert with_bypass.bypass_bn is not None
                    with_bypass.bypass_bn.eps, with_bypass.bypass_bn.momentum = unit.bn.eps, unit.bn.momentum
                    _set_module(traced, path, with_bypass)
    traced.bypass = bypass
    traced.dense_widths = {site.name: site.channels for site in traced.prunable_sites()}
    if traced.unprunable:
        warnings.warn(_warning_line(traced.unprunable, model_name), UnprunableLayersWarning, stacklevel=2)
    traced.train(was_training)
    return traced
