"""fuse-gated-conv: everything after the projection GEMM becomes one ``engram.GatedShortConv`` node.

Runs on the batched form that fuse-projections, fuse-gating and fuse-short-conv leave, when a model is
compiled for OpenVINO (``passes.lower_for_openvino``). Profiles
(``engram-export bench --profile``) showed why: after those passes each remaining step (norms, gate,
gated value, layout transposes around the conv, SiLU, residual) still reads and writes a [B,T,G,D]
tensor, and together they cost as much as the GEMM on a CPU. The node carries its standard-op
definition as a model-local function (ONNX Runtime and ``onnx.checker`` use it); OpenVINO runs the
Engram extension's fused kernel, one pass over memory.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from engram_export.onnx import op as onnx_op
from engram_export.passes._graph import (
    Refused,
    RewritePass,
    attr,
    const,
    const_array,
    given,
    match_rms_norm,
    match_signed_sqrt_gate,
    match_silu,
    other_input,
    producer,
    producer_of,
    replace_value,
    scalar,
)

__all__ = ["FuseGatedConvPass"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Block:
    proj: ir.Value
    hidden: ir.Value
    scales: np.ndarray
    conv_weight: np.ndarray
    attributes: dict
    residual: ir.Node


def _unit_norm(value: ir.Value | None) -> tuple[ir.Value, float]:
    norm = match_rms_norm(value)
    if not np.all(norm.weight == 1):
        raise Refused("RMSNormalization with a scale (expected the batched, unit-scale form)")
    return norm.x, norm.eps


def match_block(residual: ir.Node) -> Block:
    """``Add(gated, conv(gated))`` with ``gated = gate(keys, hidden) * value`` from one Split."""
    for gated in residual.inputs:
        try:
            rows = producer(producer(other_input(residual, gated), "Reshape").inputs[0], "Transpose")
            break
        except Refused:
            continue
    else:
        raise Refused("no conv branch feeding the residual Add")
    conv = producer(match_silu(rows.inputs[0]), "Conv")
    columns = producer(conv.inputs[0], "Transpose")
    normed_gated, eps_conv = _unit_norm(producer(columns.inputs[0], "Reshape").inputs[0])
    weight = const(conv.inputs[1])
    if (
        normed_gated is not gated
        or attr(rows, "perm") != [0, 2, 3, 1]
        or attr(columns, "perm") != [0, 3, 1, 2]
        or weight is None
        or weight.ndim != 4
        or len(conv.inputs) > 2
        and conv.inputs[2] is not None
    ):
        raise Refused("not the batched causal conv of the gated value")
    kernel, dilation = weight.shape[2], attr(conv, "dilations", [1, 1])
    pads = attr(conv, "pads", [0, 0, 0, 0])
    if pads != [(kernel - 1) * dilation[0], 0, 0, 0] or attr(conv, "group") != weight.shape[0]:
        raise Refused("the conv is not causal and depthwise")
    product = producer(gated, "Mul")
    gate = next((v for v in product.inputs if (node := producer_of(v)) and node.op_type == "Sigmoid"), None)
    if gate is None:
        raise Refused("gated value is not gate * value")
    value = producer(other_input(product, gate), "Unsqueeze").inputs[0]
    score, floor = match_signed_sqrt_gate(gate)
    divide = producer(score, "Div")
    reduce = producer(divide.inputs[0], "ReduceSum")
    if const_array(reduce.inputs[1], "gate: ReduceSum axes").tolist() != [-1] or attr(reduce, "keepdims", 1) != 1:
        raise Refused("gate: ReduceSum is not over the last axis")
    scaled = producer(reduce.inputs[0], "Mul")
    scales = next((const(v) for v in scaled.inputs if const(v) is not None), None)
    normed_pair = producer(next(v for v in scaled.inputs if const(v) is None), "Mul")
    first, second = (_unit_norm(v) for v in normed_pair.inputs)
    if (node := first[0].producer()) is None or node.op_type != "Reshape":
        first, second = second, first
    (keys, eps_key), (hidden, eps_query) = first, second
    split = producer(producer(keys, "Reshape").inputs[0], "Split")
    if len(split.outputs) != 2 or split.outputs[1] is not value or attr(split, "axis") != -1:
        raise Refused("keys and value are not the two parts of one projection")
    if hidden.shape is None or len(hidden.shape) != 4:
        raise Refused("hidden states are not [B,T,G,D]")
    groups, dim = hidden.shape[2], hidden.shape[3]
    if scales is None or scales.shape != (groups, dim) or weight.shape[0] != groups * dim:
        raise Refused("branch constants do not match [G, D]")
    return Block(
        given(split.inputs[0]),
        hidden,
        scales,
        weight,
        {
            "eps_key": float(eps_key),
            "eps_query": float(eps_query),
            "eps_conv": float(eps_conv),
            "score_scale": float(scalar(divide.inputs[1])),
            "floor": float(floor),
            "channels": int(weight.shape[0]),
            "dilations": dilation,
            "pads": pads,
        },
        residual,
    )


class FuseGatedConvPass(RewritePass):
    """Replace the batched post-projection block with one ``engram.GatedShortConv`` node."""

    anchor, pass_name = "Add", "fuse-gated-conv"

    def match(self, node: ir.Node) -> Block:
        return match_block(node)

    def rewrite(self, model: ir.Model, found: Block) -> None:
        self._fuse(model, found)

    @staticmethod
    def _fuse(model: ir.Model, block: Block) -> None:
        graph = model.graph
        constants = []
        for name, array in (("scales", block.scales), ("conv_weight", block.conv_weight)):
            unique = f"gated_short_conv.{name}"
            while unique in graph.initializers:
                unique += "_"
            value = ir.Value(name=unique, const_value=ir.tensor(array.astype(np.float32), name=unique))
            graph.register_initializer(value)
            constants.append(value)
        node = ir.node(
            onnx_op.GATED_CONV_OP_TYPE,
            [block.proj, block.hidden, *constants],
            attributes=block.attributes,
            domain=onnx_op.DOMAIN,
        )
        graph.insert_before(block.residual, node)
        replace_value(block.residual.outputs[0], node.outputs[0])
        function = ir.serde.deserialize_function(onnx_op.gated_short_conv_function(model.opset_imports[""]))
        model.functions.setdefault(function.identifier(), function)
        model.opset_imports.setdefault(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)
        log.info("fuse-gated-conv: gates, gated value and short conv -> one %s node", onnx_op.GATED_CONV_OP_TYPE)
