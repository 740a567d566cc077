"""Fused model -> ONNX: the dynamo exporter at opset 18, dynamic batch, onnx.checker, graph check.

The exported graph must hold no BatchNormalization and exactly one Conv per nn.Conv2d of
the fused model (`check_graph`): proof that BN and every bypass were folded.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lapp_edge.errors import UserError

OPSET = 18                    # the lowest opset the dynamo exporter emits natively (17 fails)
EXPORTER = "torch.onnx.export(dynamo=True)"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class GraphCheck:
    """What the exported graph contains, against what the fused PyTorch model holds."""

    op_counts: dict[str, int]
    conv_nodes: int
    expected_convs: int       # nn.Conv2d modules in the fused model
    unfoldable_batchnorms: int = 0   # BatchNorms of the fused model not right after a conv (a user model's pre-activation BN)

    def problem(self) -> str | None:
        if self.op_counts.get("BatchNormalization", 0) > self.unfoldable_batchnorms:
            return f"the exported graph still holds {self.op_counts['BatchNormalization']} BatchNormalization nodes"
        if self.conv_nodes != self.expected_convs:
            return f"the exported graph has {self.conv_nodes} Conv nodes, the fused model {self.expected_convs} convs"
        return None



def fused_conv_count(fused: nn.Module) -> int:
    return sum(1 for m in fused.modules() if isinstance(m, nn.Conv2d))


def strip_build_metadata(model_proto: Any) -> None:
    """Drop the exporter's per-node metadata (stack traces with this machine's absolute paths,
    FX node dumps): it changes nothing in the graph, makes the file 15% larger and the bytes
    depend on where the checkout lives."""
    for node in model_proto.graph.node:
        del node.metadata_props[:]
    for info in model_proto.graph.value_info:
        del info.metadata_props[:]
    for tensor in model_proto.graph.initializer:
        del tensor.metadata_props[:]


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], opset: int = OPSET) -> bytes:
    """`model` (eval) as one self-contained ONNX file (weights inline): input "input" float32
    N x C x H x W with a dynamic batch axis, output "logits". Raises UserError when the exporter
    fails or the result fails onnx.checker."""
    import onnx

    example = torch.zeros(2, *input_shape)
    try:
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    except Exception as error:  # noqa: BLE001 - any exporter failure is reported in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"ONNX export failed: {first[:200]}") from None
    if program is None:
        raise UserError("ONNX export returned no program")
    proto = program.model_proto
    strip_build_metadata(proto)
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"the exported ONNX model fails onnx.checker: {str(error).splitlines()[0][:200]}") from None
    return data


def check_graph(onnx_bytes: bytes, fused: nn.Module) -> GraphCheck:
    """Operator counts of the exported graph against the fused model's convs."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    counts = dict(collections.Counter(node.op_type for node in graph.node))
    batchnorms = sum(1 for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return GraphCheck(counts, counts.get("Conv", 0), fused_conv_count(fused), batchnorms)
