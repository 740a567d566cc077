"""Zero-pad an ONNX network's narrow channel spaces to a kernel block: the same function, wider tensors.

A *channel space* is a set of N x C x H x W activations that share their channel axis: a convolution's output,
what elementwise ops, pooling and adds carry it into, the residual adds that join several convolutions' outputs,
up to the convolutions (or the classifier's Gemm, after a global pooling) that read it. Padding a space of C
channels to C' (the next multiple of the block) gives each convolution writing it C' - C extra filters of zero
weights and zero bias, each depthwise convolution in it C' - C extra zero channels, each per-channel constant
added or multiplied there zeros, and every reader zero weights for the extra input channels. The extra channels
then carry zeros (or, past an op with f(0) != 0, values no reader weighs): the logits are unchanged.

Why: ONNX Runtime's int8 QLinearConv is slower writing 8 output channels than 16 on the AVX-512 EPYC without
AVX-VNNI (one 3x3 conv at 28 x 28, batch 32, one thread: 16 -> 8 channels 869 us, 16 -> 16 618 us, 8 -> 16 481 us;
docs/RESULTS.md, "ORT int8: narrow layers padded to 16 channels"), so the demo's slim ResNet-20 ran 5-7% faster
in int8 with its 8- and 56-channel spaces padded to 16 and 64, while every float target and OpenVINO int8 ran
11-21% slower padded. Whether it pays is the CPU's and the runtime's: the ORT backend measures both forms
(`onnxruntime_cpu.OnnxRuntimeCpu.load`).

Only what this module recognises is padded; a space that reaches anything else (a graph input or output, a
grouped non-depthwise convolution, an op outside `CHANNEL_WISE_OPS`, a constant whose channel axis is not 1 or
C) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Ops that act on each channel on its own and keep the channel axis (one input activation; `Clip`'s bounds are scalars)
CHANNEL_WISE_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Identity", "MaxPool", "AveragePool", "GlobalAveragePool",
                             "GlobalMaxPool"})
# Binary ops whose per-channel constant is padded with zeros (x + 0, x - 0, x * 0 are finite)
BINARY_OPS = frozenset({"Add", "Sub", "Mul"})


@dataclass
class ChannelSpace:
    """One channel space of an ONNX graph: its activations, who writes and reads it, and why it cannot be
    padded (empty when it can). `width`: the channel count C its writing convolutions give it (0: none)."""

    tensors: set[str] = field(default_factory=set)
    writers: list[Any] = field(default_factory=list)          # Conv nodes (group 1) whose output is in the space
    depthwise: list[Any] = field(default_factory=list)        # depthwise Conv nodes, input and output in the space
    readers: list[Any] = field(default_factory=list)          # Conv nodes (group 1) reading the space
    constants: list[tuple[Any, int]] = field(default_factory=list)   # (binary node, input position) of a per-channel constant
    gemms: list[Any] = field(default_factory=list)            # Gemm nodes reading the space as N x C
    reshapes: list[Any] = field(default_factory=list)         # Reshape nodes taking N x C x 1 x 1 to N x C
    refused: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.writers[0].width) if self.writers else 0


class _Conv:
    """A Conv node and the dims of its weight (from the initializer)."""

    def __init__(self, node: Any, weight_dims: list[int]) -> None:
        self.node = node
        self.weight_dims = weight_dims

    @property
    def width(self) -> int:
        return self.weight_dims[0]


def _attribute(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


class _Spaces:
    """Union-find over activation names; each root collects its space's members."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, *names: str) -> None:
        roots = [self.find(name) for name in names]
        for root in roots[1:]:
            self.parent[root] = roots[0]


def channel_spaces(model: Any) -> list[ChannelSpace]:
    """The channel spaces of `model` (an ONNX ModelProto with 4-D NCHW activations and weights as
    initializers) that at least one group-1 Conv writes, each with what writes and reads it and, in `refused`,
    why it cannot be padded. Shape inference supplies the N x C x 1 x 1 shapes a Reshape or
    Flatten to N x C needs."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes: dict[str, list[int | None]] = {
        info.name: [dim.dim_value if dim.HasField("dim_value") else None for dim in info.type.tensor_type.shape.dim]
        for info in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    spaces = _Spaces()
    roles: list[tuple[str, str, Any]] = []          # (activation, ChannelSpace list field, payload), filed once spaces are joined
    refusals: list[tuple[str, str]] = []

    def refuse(name: str, why: str) -> None:
        spaces.find(name)
        refusals.append((name, why))

    for node in graph.node:
        activations = [name for name in node.input if name and name not in initializers]
        op = node.op_type
        if op == "Conv":
            if len(node.input) < 2 or node.input[1] not in initializers or node.input[0] in initializers:
                for name in [*activations, *node.output]:
                    refuse(name, f"Conv {node.name} has no initializer weight")
                continue
            dims = list(initializers[node.input[1]].dims)
            group = int(_attribute(node, "group", 1))
            if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
                refuse(node.output[0], f"Conv {node.name} has a computed bias")
            if group == 1:
                roles.append((node.output[0], "writers", _Conv(node, dims)))
                roles.append((node.input[0], "readers", _Conv(node, dims)))
            elif group == dims[0] and dims[1] == 1:
                spaces.union(node.input[0], node.output[0])
                roles.append((node.output[0], "depthwise", _Conv(node, dims)))
            else:
                refuse(node.input[0], f"grouped Conv {node.name}")
                refuse(node.output[0], f"grouped Conv {node.name}")
        elif op in CHANNEL_WISE_OPS and len(activations) == 1 and len(node.output) == 1:
            spaces.union(activations[0], node.output[0])
        elif op in BINARY_OPS and len(node.input) == 2 and activations:
            spaces.union(*activations, node.output[0])
            for position, name in enumerate(node.input):
                if name in initializers:
                    shape = list(initializers[name].dims)
                    if len(shape) > 4 or (len(shape) == 4 and shape[0] != 1):
                        refuse(node.output[0], f"{op} {node.name} constant of shape {shape}")
                    elif len(shape) >= 3 and shape[-3] != 1:
                        roles.append((node.output[0], "constants", (node, position)))
        elif op == "ReduceMean" and len(node.output) == 1 and activations:
            axes = (list(numpy_helper.to_array(initializers[node.input[1]]).ravel()) if len(node.input) > 1 and node.input[1] in initializers
                    else _attribute(node, "axes", None))
            if axes is not None and not {int(axis) % 4 for axis in axes} & {0, 1} and int(_attribute(node, "keepdims", 1)) == 1:
                spaces.union(activations[0], node.output[0])
            else:
                refuse(activations[0], f"ReduceMean {node.name} over the channel axis or without keepdims")
        elif op in ("Reshape", "Flatten") and activations:
            source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
            if (source is not None and target is not None and len(source) == 4 and source[2:] == [1, 1]
                    and len(target) == 2 and target[1] == source[1] and (op == "Flatten" or node.input[1] in initializers)):
                spaces.union(node.input[0], node.output[0])
                if op == "Reshape":
                    roles.append((node.output[0], "reshapes", node))
            else:
                refuse(activations[0], f"{op} {node.name} other than N x C x 1 x 1 -> N x C")
        elif op == "Gemm" and activations == [node.input[0]] and len(node.input) > 1 and node.input[1] in initializers:
            if int(_attribute(node, "transA", 0)) == 0:
                roles.append((node.input[0], "gemms", node))
            else:
                refuse(node.input[0], f"Gemm {node.name} with transA")
        else:
            for name in activations:
                refuse(name, f"{op} {node.name}")
    for value in graph.input:
        refuse(value.name, f"graph input {value.name}")
    for value in graph.output:
        refuse(value.name, f"graph output {value.name}")

    found: dict[str, ChannelSpace] = {}
    for name in list(spaces.parent):
        found.setdefault(spaces.find(name), ChannelSpace()).tensors.add(name)
    for name, role, payload in roles:
        space = found.setdefault(spaces.find(name), ChannelSpace(tensors={name}))
        getattr(space, role).append(payload)
    for name, why in refusals:
        found[spaces.find(name)].refused.append(why)
    result = []
    for space in found.values():
        if not space.writers:
            continue
        widths = {conv.width for conv in [*space.writers, *space.depthwise]}
        if len(widths) != 1:
            space.refused.append(f"writers of {sorted(widths)} channels")
        for node, position in space.constants:
            shape = list(initializers[node.input[position]].dims)
            if shape[-3] not in (1, space.width):
                space.refused.append(f"{node.op_type} {node.name} constant of shape {shape}")
        result.append(space)
    return result


def _padded(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths)


def pad_channels(model: Any, multiple: int) -> list[tuple[int, int]]:
    """Zero-pad, in place in `model` (an ONNX ModelProto), every paddable channel space whose width is not a
    multiple of `multiple` to the next multiple (module docstring). Every padded weight, bias or constant is a
    new initializer (originals another node still reads stay); stale shape annotations of padded activations
    are dropped. Returns (width, padded width) per padded space, [] when nothing was padded. ValueError for
    `multiple` < 1."""
    from onnx import helper, numpy_helper

    if multiple < 1:
        raise ValueError(f"channel multiple must be >= 1, not {multiple}")
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def replace(node: Any, position: int, array: np.ndarray, suffix: str) -> None:
        name = f"{node.input[position]}.{suffix}"
        while name in initializers:
            name += "_"
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        graph.initializer.append(tensor)
        initializers[name] = tensor
        node.input[position] = name

    def value(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(initializers[name])
        return arrays[name]

    padded: list[tuple[int, int]] = []
    stale: set[str] = set()
    for space in channel_spaces(model):
        width = space.width
        if space.refused or width % multiple == 0:
            continue
        target = -(-width // multiple) * multiple
        tag = f"pad{target}"
        for conv in space.writers:
            replace(conv.node, 1, _padded(value(conv.node.input[1]), 0, target), tag)
            if len(conv.node.input) > 2 and conv.node.input[2]:
                replace(conv.node, 2, _padded(value(conv.node.input[2]), 0, target), tag)
        for conv in space.depthwise:
            replace(conv.node, 1, _padded(value(conv.node.input[1]), 0, target), tag)
            if len(conv.node.input) > 2 and conv.node.input[2]:
                replace(conv.node, 2, _padded(value(conv.node.input[2]), 0, target), tag)
            for attribute in list(conv.node.attribute):
                if attribute.name == "group":
                    conv.node.attribute.remove(attribute)
            conv.node.attribute.append(helper.make_attribute("group", target))
        for conv in space.readers:
            replace(conv.node, 1, _padded(value(conv.node.input[1]), 1, target), tag)
        for node, position in space.constants:
            constant = value(node.input[position])
            if constant.shape[-3] != 1:
                replace(node, position, _padded(constant, constant.ndim - 3, target), tag)
        for node in space.gemms:
            axis = 1 if int(_attribute(node, "transB", 0)) == 1 else 0
            replace(node, 1, _padded(value(node.input[1]), axis, target), tag)
        for node in space.reshapes:
            shape = value(node.input[1]).copy()
            if shape.size == 2 and shape[1] == width:
                shape[1] = target
                replace(node, 1, shape, tag)
        stale |= space.tensors
        padded.append((width, target))
    if padded:
        for info in list(graph.value_info):
            if info.name in stale:
                graph.value_info.remove(info)
        used = {name for node in graph.node for name in node.input} | {value.name for value in graph.input}
        for tensor in list(graph.initializer):
            if tensor.name not in used:
                graph.initializer.remove(tensor)
    return padded
