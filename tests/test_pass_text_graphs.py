"""Graph passes on small graphs written in ONNX text, independent of the exporter: what fires, what the
graph becomes, and equal outputs in ONNX Runtime (optimizations off; fuse-projections regroups GEMM
columns only: max |diff| / max |ref| <= 1e-6).

Only fuse-projections is covered this way so far: the other three passes match the exported Engram
block as a whole and are tested on that graph (``tests/test_passes.py``)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime

from engram_export.passes import FuseProjectionsPass


def _values(rng, *shape) -> str:
    return ", ".join(f"{v:.6f}" for v in rng.standard_normal(shape).ravel())


def _model(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def test_fuse_projections_on_a_text_graph():
    """Three projections of x (two with a bias, one without) and one of another tensor: the three become
    one MatMul + Add + Split; the fourth is left alone; a second run changes nothing."""
    rng = np.random.default_rng(0)
    text = f"""
    <ir_version: 10, opset_import: ["" : 23]>
    projections (float[2, 4] x) => (float[2, 3] a, float[2, 5] b, float[2, 2] c, float[2, 3] d) <
        float[4, 3] wa = {{{_values(rng, 4, 3)}}}, float[3] ba = {{{_values(rng, 3)}}},
        float[4, 5] wb = {{{_values(rng, 4, 5)}}}, float[5] bb = {{{_values(rng, 5)}}},
        float[4, 2] wc = {{{_values(rng, 4, 2)}}}, float[3, 3] wd = {{{_values(rng, 3, 3)}}}
    > {{
        pa = MatMul(x, wa)
        a = Add(pa, ba)
        pb = MatMul(x, wb)
        b = Add(bb, pb)
        c = MatMul(x, wc)
        d = MatMul(a, wd)
    }}
    """
    before, model = _model(text), _model(text)
    result = ir.passes.PassManager([FuseProjectionsPass(), ir.passes.common.RemoveUnusedNodesPass()])(model)
    assert result.modified
    assert _ops(model) == collections.Counter({"MatMul": 2, "Add": 1, "Split": 1})  # fused + the one on `a`
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for got, expected in zip(_run(model, x), _run(before, x)):
        assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    assert not FuseProjectionsPass()(model).modified  # idempotent


def test_fuse_projections_leaves_a_single_projection_alone():
    rng = np.random.default_rng(1)
    model = _model(f"""
    <ir_version: 10, opset_import: ["" : 23]>
    single (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {{{_values(rng, 4, 3)}}}> {{
        y = MatMul(x, w)
    }}
    """)
    assert not FuseProjectionsPass()(model).modified
    assert _ops(model) == collections.Counter({"MatMul": 1})
