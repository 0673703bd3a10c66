"""Each graph pass: fires on the exported graph, refuses what it must not touch, is idempotent, keeps
the outputs (ONNX Runtime, graph optimizations off, seeded inputs) and passes ``onnx.checker``.

Equality: fuse-projections only regroups GEMM columns, so outputs agree to float32 rounding of the
GEMM (max_rel 1e-6). fuse-gating and fuse-short-conv fold the norms' scales into a product and into
the conv weights, which reassociates float32 multiplications: max |diff| / max |ref| <= 1e-5.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest

from engram_export.measure.verify import random_inputs
from engram_export.passes import (
    FuseGatedConvPass,
    FuseGatingPass,
    FuseProjectionsPass,
    FuseShortConvPass,
    lower_for_openvino,
    optimize,
)

SHAPES = [(1, 1), (3, 17), (50, 14)]


@pytest.fixture
def raw(tiny_raw_files) -> ir.Model:
    """A fresh copy of the raw trace of the tiny layer."""
    return ir.load(tiny_raw_files["onnx"])


def run(model: ir.Model, ids: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "hidden_states": hidden})[0]


def assert_same_outputs(before: ir.Model, after: ir.Model, config, max_rel: float) -> None:
    for batch, tokens in SHAPES:
        ids, hidden = random_inputs(config, config.vocab_size, batch, tokens, seed=batch + tokens)
        expected, got = run(before, ids, hidden), run(after, ids, hidden)
        assert np.abs(got - expected).max() <= max_rel * np.abs(expected).max(), (batch, tokens)


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def apply(pass_, model: ir.Model) -> bool:
    result = ir.passes.PassManager([pass_, ir.passes.common.RemoveUnusedNodesPass()])(model)
    return result.modified


@pytest.mark.parametrize(
    "pass_type,max_rel,expected",
    [
        (FuseProjectionsPass, 1e-6, {"MatMul": 1, "Split": 1}),
        (FuseGatingPass, 1e-5, {"RMSNormalization": 2 + 4, "ReduceSum": 1, "Sigmoid": 1 + 1}),
        (FuseShortConvPass, 1e-5, {"RMSNormalization": 8 + 1, "Conv": 1, "Slice": 0, "Gather": 4}),
    ],
)
def test_pass_fires_keeps_outputs_and_is_idempotent(raw, tiny_config, tiny_raw_files, pass_type, max_rel, expected):
    assert apply(pass_type(), raw)
    for op, count in expected.items():
        assert ops(raw)[op] == count, (op, ops(raw))
    check(raw)
    assert_same_outputs(ir.load(tiny_raw_files["onnx"]), raw, tiny_config, max_rel)
    assert not pass_type()(raw).modified


def test_optimize_runs_the_standard_passes_together(raw, tiny_config, tiny_raw_files):
    """fuse-projections, fuse-gating and fuse-short-conv: the batched standard-op form."""
    before = ops(raw)
    assert optimize(raw).modified
    after = ops(raw)
    assert sum(after.values()) < sum(before.values()) / 2
    assert after["MatMul"] == 1 and after["RMSNormalization"] == 3 and after["Conv"] == 1
    assert after["Gather"] == 0 and after["Slice"] == 0 and after["Concat"] == 0
    (conv,) = [n for n in raw.graph if n.op_type == "Conv"]
    reach = (tiny_config.kernel_size - 1) * tiny_config.max_ngram_size
    assert list(conv.attributes["pads"].value) == [reach, 0, 0, 0]  # causal: left padding only
    assert [n.domain for n in raw.graph].count("engram") == 1  # still one custom node
    check(raw)
    assert_same_outputs(ir.load(tiny_raw_files["onnx"]), raw, tiny_config, 1e-5)
    assert not optimize(raw).modified


def test_fuse_gated_conv_on_the_batched_form(raw, tiny_config, tiny_raw_files):
    assert not FuseGatedConvPass()(raw).modified  # refuses the raw, per-branch form
    optimize(raw)
    assert lower_for_openvino(raw).modified
    assert [(n.domain, n.op_type) for n in raw.graph] == [
        ("engram", "HashGather"),
        ("", "MatMul"),
        ("", "Add"),
        ("engram", "GatedShortConv"),
    ]
    assert sorted(f.name for f in raw.functions.values()) == ["GatedShortConv", "HashGather"]
    check(raw)
    assert_same_outputs(ir.load(tiny_raw_files["onnx"]), raw, tiny_config, 1e-5)
    assert not lower_for_openvino(raw).modified


def test_gated_conv_kernel_in_openvino_matches_its_function(raw, tiny_config, tmp_path):
    """The fused C++ kernel against the node's own standard-op definition (run by ONNX Runtime)."""
    from engram_export.onnx.export import save_onnx
    from engram_export.openvino.extension import openvino_core

    optimize(raw)
    lower_for_openvino(raw)
    path = save_onnx(raw, tmp_path / "fused.onnx")
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = {op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()}
    assert "Reference" in kinds and "Convolution" not in kinds  # the fused kernel, not the body
    for batch, tokens in SHAPES + [(2, 40)]:
        ids, hidden = random_inputs(tiny_config, tiny_config.vocab_size, batch, tokens, seed=7)
        expected = run(raw, ids, hidden)
        got = compiled({"input_ids": ids, "hidden_states": hidden})[0]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), (batch, tokens)


def _node(model: ir.Model, op_type: str, index: int = 0) -> ir.Node:
    return [n for n in model.graph if n.op_type == op_type][index]


def test_fuse_projections_refuses_non_constant_weights():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 3]))
    first = ir.node("MatMul", [x, w])
    second = ir.node("MatMul", [x, w])
    graph = ir.Graph([x, w], [first.outputs[0], second.outputs[0]], nodes=[first, second], opset_imports={"": 23})
    assert not FuseProjectionsPass()(ir.Model(graph, ir_version=11)).modified


def test_fuse_projections_refuses_a_single_projection(raw):
    apply(FuseProjectionsPass(), raw)
    assert not FuseProjectionsPass()(raw).modified  # one MatMul left on the embedding


def test_fuse_gating_refuses_branches_out_of_order(raw):
    stack = _node(raw, "Concat", 0)
    first, second = stack.inputs[0], stack.inputs[1]
    stack.replace_input_with(0, second)
    stack.replace_input_with(1, first)
    assert not FuseGatingPass()(raw).modified


def test_fuse_gating_refuses_mixed_eps(raw):
    norm = _node(raw, "RMSNormalization", 1)  # a query norm of one branch
    norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", 1e-3)
    assert not FuseGatingPass()(raw).modified


def test_fuse_short_conv_refuses_other_padding(raw):
    conv = _node(raw, "Conv")
    conv.attributes["pads"] = ir.AttrInt64s("pads", [9, 0])
    assert not FuseShortConvPass()(raw).modified


def test_fuse_short_conv_refuses_a_crop_that_does_not_start_at_zero(raw):
    crop = _node(raw, "Slice")
    start = ir.Value(name="start1", const_value=ir.tensor(np.array([1], np.int64), name="start1"))
    raw.graph.register_initializer(start)
    crop.replace_input_with(1, start)
    assert not FuseShortConvPass()(raw).modified


def test_one_branch_model_is_optimized_too(tiny_config, tmp_path):
    """hc_mult 1: no Concat stacks the gates or joins the conv's norms; the passes still fire."""
    from engram_export.models.weights import build_layer
    from engram_export.onnx.export import export_layer

    config = tiny_config.replace(hc_mult=1)
    path = export_layer(build_layer(config, 3, seed=0), tmp_path / "g1.onnx", optimize=False)
    model = ir.load(path)
    assert optimize(model).modified and lower_for_openvino(model).modified
    assert [n.op_type for n in model.graph] == ["HashGather", "MatMul", "Add", "GatedShortConv"]
    assert_same_outputs(ir.load(path), model, config, 1e-5)
