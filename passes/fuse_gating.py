"""fuse-gating: the per-branch gate chains become one computation over the branch axis.

Per branch i the reference computes ``k_i = RMSNorm1_i(key_i)``, ``q_i = RMSNorm2_i(hidden[:, :, i])``,
``g = sum(k_i * q_i) / sqrt(D)``, ``gate_i = sigmoid(sign(g) * sqrt(max(|g|, eps)))`` and stacks the
gates on axis 2. Rewritten: keys [B,T,G,D] and hidden [B,T,G,D] are normalized with [G,D] weights and
reduced once, giving the stacked [B,T,G,1] gates directly. The norms' scales are folded into one
[G,D] constant of the dot product (``k*w1 . q*w2 = k . q*(w1*w2)``), so each RMSNormalization has a unit
scale and OpenVINO runs it as its fused RMS kernel; results change only by float rounding.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from engram_export.passes._graph import (
    Builder,
    Refused,
    RewritePass,
    attr,
    const,
    const_array,
    given,
    match_rms_norm,
    match_signed_sqrt_gate,
    producer,
    replace_value,
    scalar,
)

__all__ = ["FuseGatingPass", "merged_last_axis"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Gate:
    key: ir.Value
    hidden: ir.Value
    branch: int
    key_norm: tuple[np.ndarray, float]
    query_norm: tuple[np.ndarray, float]
    scale: float
    floor: float


def _unsqueezed_axes(node: ir.Node) -> list[int]:
    axes = const(node.inputs[1])
    if axes is None:
        raise Refused("Unsqueeze with non-constant axes")
    return axes.tolist()


def match_gate(value: ir.Value | None) -> Gate:
    """One branch's gate, from its stacked [B,T,1,1] form back to the key and the hidden state."""
    outer = producer(value, "Unsqueeze")
    inner = producer(outer.inputs[0], "Unsqueeze")
    if _unsqueezed_axes(outer) != [2] or _unsqueezed_axes(inner) not in ([-1], [2]):
        raise Refused("gate: unexpected Unsqueeze axes")
    score, floor = match_signed_sqrt_gate(inner.inputs[0])
    divide = producer(score, "Div")
    reduce = producer(divide.inputs[0], "ReduceSum")
    if (
        const_array(reduce.inputs[1], "gate: ReduceSum axes").tolist() not in ([-1], [2])
        or attr(reduce, "keepdims", 1) != 0
    ):
        raise Refused("gate: ReduceSum is not over the last axis")
    product = producer(reduce.inputs[0], "Mul")
    key_norm, query_norm = (match_rms_norm(v) for v in product.inputs)
    if (key_producer := key_norm.x.producer()) is not None and key_producer.op_type == "Gather":
        key_norm, query_norm = query_norm, key_norm
    select = producer(query_norm.x, "Gather")
    if attr(select, "axis") != 2 or const(select.inputs[1]) is None:
        raise Refused("gate: query is not hidden[:, :, i, :]")
    return Gate(
        key_norm.x,
        given(select.inputs[0]),
        int(const_array(select.inputs[1], "gate: branch index")),
        (key_norm.weight, key_norm.eps),
        (query_norm.weight, query_norm.eps),
        scalar(divide.inputs[1]),
        floor,
    )


def merged_last_axis(build: Builder, values: list[ir.Value]) -> ir.Value:
    """``Concat(values, axis=-1)``; when they are consecutive outputs of one Split on the last axis,
    a Split with those outputs merged instead, so nothing is copied."""
    if len(values) == 1:
        return values[0]
    split = values[0].producer()
    if (
        split is not None
        and split.op_type == "Split"
        and attr(split, "axis") == -1
        and all(v.producer() is split for v in values)
    ):
        positions = [index for v in values if (index := v.index()) is not None]
        sizes = const(split.inputs[1])
        if sizes is not None and positions == list(range(positions[0], positions[-1] + 1)):
            merged = [
                *sizes[: positions[0]],
                sizes[positions[0] : positions[-1] + 1].sum(),
                *sizes[positions[-1] + 1 :],
            ]
            parts = build.ops(
                "Split", split.inputs[0], build.constant("split", np.array(merged)), axis=-1, num_outputs=len(merged)
            )
            for old, new in zip(
                [o for i, o in enumerate(split.outputs) if not positions[0] <= i <= positions[-1]],
                [p for i, p in enumerate(parts) if i != positions[0]],
                strict=True,
            ):
                replace_value(old, new)
            return parts[positions[0]]
    return build.op("Concat", *values, axis=-1)


class FuseGatingPass(RewritePass):
    """Batch the hyper-connection gates: G gate chains stacked by a Concat -> one chain."""

    # G branches are stacked by a Concat; a single branch (hc_mult 1) only by its own Unsqueeze
    anchor, pass_name = ("Concat", "Unsqueeze"), "fuse-gating"

    def match(self, node: ir.Node) -> tuple[ir.Node, list[Gate]]:
        if node.op_type == "Concat":
            if attr(node, "axis") != 2 or len(node.inputs) < 2:
                raise Refused("not a stack of branches on axis 2")
            gates = [match_gate(v) for v in node.inputs]
        else:
            if any(use.node.op_type == "Concat" for use in node.outputs[0].uses()):
                raise Refused("one of several stacked branches")
            gates = [match_gate(node.outputs[0])]
        self._check(gates)
        return node, gates

    def rewrite(self, model: ir.Model, found) -> None:
        self._fuse(model.graph, *found)

    @staticmethod
    def _check(gates: list[Gate]) -> None:
        if [g.branch for g in gates] != list(range(len(gates))):
            raise Refused("branches are not stacked in order 0..G-1")
        first = gates[0]
        for g in gates:
            if g.hidden is not first.hidden or (g.scale, g.floor) != (first.scale, first.floor):
                raise Refused("branches read different hidden states or constants")
            if (g.key_norm[1], g.query_norm[1]) != (first.key_norm[1], first.query_norm[1]):
                raise Refused("branches use different RMSNorm eps")
        shape = first.hidden.shape
        if shape is None or len(shape) != 4 or shape[2] != len(gates):
            raise Refused(f"hidden states are not [B,T,{len(gates)},D]")

    @staticmethod
    def _fuse(graph: ir.Graph, concat: ir.Node, gates: list[Gate]) -> None:
        build = Builder(graph, "fused_gating")
        groups, dim = len(gates), gates[0].key_norm[0].shape[0]
        keys = build.op(
            "Reshape",
            merged_last_axis(build, [g.key for g in gates]),
            build.constant("shape", np.array([0, 0, groups, dim], np.int64)),
        )
        keys = build.rms_norm(keys, gates[0].key_norm[1], dim)
        query = build.rms_norm(gates[0].hidden, gates[0].query_norm[1], dim)
        # sum(k * w1 * q * w2): both norms' scales folded into one [G, D] constant
        scales = np.stack([g.key_norm[0] * g.query_norm[0] for g in gates])
        product = build.op("Mul", build.op("Mul", keys, query), build.constant("norm_scales", scales))
        score = build.op("ReduceSum", product, build.constant("last_axis", np.array([-1], np.int64)), keepdims=1)
        score = build.op("Div", score, build.constant("scale", np.array(gates[0].scale, np.float32)))
        magnitude = build.op(
            "Sqrt",
            build.op("Clip", build.op("Abs", score), build.constant("floor", np.array(gates[0].floor, np.float32))),
        )
        gate = build.op("Sigmoid", build.op("Mul", magnitude, build.op("Sign", score)))
        build.insert_before(concat)
        replace_value(concat.outputs[0], gate)
        log.info("fuse-gating: %d branch gates -> one [B,T,%d,%d] computation", groups, groups, dim)
