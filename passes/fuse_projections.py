"""fuse-projections: projections that read the same tensor become one MatMul (+ bias) and a Split.

The reference layer projects the embedding five times (four keys, one value), each ``[E] -> [D]``.
One ``[E] -> [5D]`` MatMul reads the embedding once and runs at the GEMM's full efficiency.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from engram_export.passes._graph import Builder, const, replace_value

__all__ = ["FuseProjectionsPass"]

log = logging.getLogger(__name__)


def _projection(node: ir.Node, source: ir.Value):
    """(matmul, bias node or None, weight, bias or None) if ``node`` is ``source @ W (+ b)``."""
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[0] is not source:
        return None
    weight = const(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    users = list(node.outputs[0].uses())
    if len(users) == 1 and users[0].node.op_type == "Add" and not node.outputs[0].is_graph_output():
        add = users[0].node
        other = add.inputs[1 - users[0].idx]
        bias = const(other)
        if bias is not None and bias.shape == (weight.shape[1],):
            return node, add, weight, bias
    return node, None, weight, None


class FuseProjectionsPass(ir.passes.InPlacePass):
    """Merge every group of >= 2 constant-weight MatMuls (with optional bias Add) on one input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for source in [v for node in graph for v in node.outputs] + list(graph.inputs):
            group = [p for use in list(source.uses()) if (p := _projection(use.node, source))]
            if len(group) < 2:
                continue
            if len({p[2].dtype for p in group} | {source.dtype.numpy() if source.dtype else None}) > 1:
                log.debug("fuse-projections: %s: weights of different dtypes", source.name)
                continue
            self._fuse(graph, source, group)
            modified = True
        if modified:
            model.graph.sort()
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _fuse(graph: ir.Graph, source: ir.Value, group) -> None:
        build = Builder(graph, "fused_projection")
        weight = np.concatenate([p[2] for p in group], axis=1)
        bias = np.concatenate([p[3] if p[3] is not None else np.zeros(p[2].shape[1], p[2].dtype) for p in group])
        sizes = np.array([p[2].shape[1] for p in group], np.int64)
        fused = build.op(
            "Add", build.op("MatMul", source, build.constant("weight", weight)), build.constant("bias", bias)
        )
        parts = build.ops("Split", fused, build.constant("sizes", sizes), axis=-1, num_outputs=len(group))
        first = min(graph.index(p[0]) for p in group)
        build.insert_before(graph.node(first))
        for (matmul, add, _, _), part in zip(group, parts, strict=True):
            replace_value((add or matmul).outputs[0], part)
        log.info(
            "fuse-projections: %d projections of %s -> one MatMul [%d, %d]", len(group), source.name, *weight.shape
        )
