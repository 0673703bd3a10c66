"""Graph passes on small graphs written in ONNX text, independent of the exporter: what fires, what the
graph becomes, and equal outputs in ONNX Runtime (optimizations off). Tolerances, max |diff| / max |ref|:
fuse-projections regroups GEMM columns only (1e-6); the other passes fold norm scales into other
constants and reorder reductions (1e-5: a few float32 roundings on values of order 1).

The exported Engram block, where all four meet, is tested in ``tests/test_passes.py``."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime

from engram_export.passes import FuseGatedConvPass, FuseGatingPass, FuseProjectionsPass, FuseShortConvPass


def _values(rng, *shape) -> str:
    return ", ".join(f"{v:.6f}" for v in rng.standard_normal(shape).ravel())


def _model(text: str) -> ir.Model:
    """The parsed model with its intermediate shapes inferred (the passes check T and [G, D])."""
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True, data_prop=True)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray, **feeds: np.ndarray) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x, **feeds})


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
    for got, expected in zip(_run(model, x), _run(before, x), strict=True):
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


# G = 2 branches of D = 4; x is [B, T, 3*D] (two keys, then the value), h the hidden states [B, T, G, D]
_HEADER = '<ir_version: 10, opset_import: ["" : 23]>'


def _constants(rng, kernel: int = 3) -> str:
    return f"""
        float[4] kn0 = {{{_values(rng, 4)}}}, float[4] kn1 = {{{_values(rng, 4)}}},
        float[4] qn0 = {{{_values(rng, 4)}}}, float[4] qn1 = {{{_values(rng, 4)}}},
        float[4] cn0 = {{{_values(rng, 4)}}}, float[4] cn1 = {{{_values(rng, 4)}}},
        float[8, 1, {kernel}] w = {{{_values(rng, 8, 1, kernel)}}},
        int64 i0 = {{0}}, int64 i1 = {{1}}, int64[3] sizes = {{4, 4, 4}}, int64[1] last = {{-1}},
        int64[1] ax2 = {{2}}, int64[1] zero = {{0}}, int64[4] grouped = {{0, 0, 2, 4}},
        float scale = {{2.0}}, float floor = {{0.000001}}"""


def _gates(branches=(0, 1)) -> str:
    """The reference's per-branch gates of keys k0, k1 against h[:, :, i], stacked on axis 2 -> gates."""
    lines = []
    for i in branches:
        lines.append(f"""
        h{i} = Gather <axis = 2> (h, i{i})
        nk{i} = RMSNormalization <axis = -1, epsilon = 0.00001> (k{i}, kn{i})
        nq{i} = RMSNormalization <axis = -1, epsilon = 0.00001> (h{i}, qn{i})
        p{i} = Mul(nk{i}, nq{i})
        s{i} = ReduceSum <keepdims = 0> (p{i}, last)
        d{i} = Div(s{i}, scale)
        a{i} = Abs(d{i})
        c{i} = Clip(a{i}, floor)
        r{i} = Sqrt(c{i})
        g{i} = Sign(d{i})
        m{i} = Mul(r{i}, g{i})
        e{i} = Sigmoid(m{i})
        u{i} = Unsqueeze(e{i}, last)
        uu{i} = Unsqueeze(u{i}, ax2)""")
    return "".join(lines) + f"\n        gates = Concat <axis = 2> ({', '.join(f'uu{i}' for i in branches)})"


def _short_conv(value: str, pads: str = "4, 4") -> str:
    """The reference's short conv of ``value`` [B,T,2,4]: branch norms, symmetric padding, crop, SiLU,
    residual -> y (kernel 3, dilation 2: reach 4)."""
    return f"""
        b0 = Gather <axis = 2> ({value}, i0)
        b1 = Gather <axis = 2> ({value}, i1)
        n0 = RMSNormalization <axis = -1, epsilon = 0.00001> (b0, cn0)
        n1 = RMSNormalization <axis = -1, epsilon = 0.00001> (b1, cn1)
        joined = Concat <axis = -1> (n0, n1)
        channels = Transpose <perm = [0, 2, 1]> (joined)
        conv = Conv <group = 8, dilations = [2], pads = [{pads}], strides = [1]> (channels, w)
        length = Shape <start = 1, end = 2> ({value})
        crop = Slice(conv, zero, length, last)
        sig = Sigmoid(crop)
        act = Mul(crop, sig)
        back = Transpose <perm = [0, 2, 1]> (act)
        rows = Reshape(back, grouped)
        y = Add({value}, rows)"""


def _check_rewrite(text: str, passes: list, expected_ops: dict, feeds: dict) -> ir.Model:
    """Run ``passes`` on the graph: it changes, holds ``expected_ops``, checks, computes the same, and a
    second run changes nothing."""
    before, model = _model(text), _model(text)
    cleanup = [ir.passes.common.RemoveUnusedNodesPass(), ir.passes.common.RemoveUnusedFunctionsPass()]
    assert ir.passes.PassManager([*passes, *cleanup])(model).modified
    counts = _ops(model)
    assert {op: counts[op] for op in expected_ops} == expected_ops, counts
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    for got, expected in zip(_run(model, **feeds), _run(before, **feeds), strict=True):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert not ir.passes.PassManager(passes)(model).modified  # idempotent
    return model


def _feeds(rng, batch: int = 2, tokens: int = 7) -> dict:
    return {
        "x": rng.standard_normal((batch, tokens, 12)).astype(np.float32),
        "h": rng.standard_normal((batch, tokens, 2, 4)).astype(np.float32),
    }


def test_fuse_gating_on_a_text_graph():
    """Two branch gates stacked by a Concat become one [B,T,2,1] chain with one pair of norms; the keys'
    Split is regrouped so that no Concat copies them."""
    rng = np.random.default_rng(2)
    text = f"""{_HEADER}
    gating (float[B, T, 12] x, float[B, T, 2, 4] h) => (float[B, T, 2, 1] gates, float[B, T, 4] v) <
        {_constants(rng)}
    > {{
        k0, k1, v = Split <axis = -1> (x, sizes){_gates()}
    }}"""
    _check_rewrite(
        text,
        [FuseGatingPass()],
        {"RMSNormalization": 2, "Gather": 0, "Concat": 0, "Sigmoid": 1, "Split": 1},
        _feeds(rng),
    )


def test_fuse_gating_refuses_branches_out_of_order():
    rng = np.random.default_rng(3)
    text = f"""{_HEADER}
    gating (float[B, T, 12] x, float[B, T, 2, 4] h) => (float[B, T, 2, 1] gates) <{_constants(rng)}> {{
        k0, k1, v = Split <axis = -1> (x, sizes){_gates(branches=(1, 0))}
    }}"""
    model = _model(text)
    assert not FuseGatingPass()(model).modified
    assert _ops(model)["Sigmoid"] == 2


def test_fuse_short_conv_on_a_text_graph():
    """Two branch norms, a symmetrically padded conv and its crop become one norm and a causal conv."""
    rng = np.random.default_rng(4)
    text = f"""{_HEADER}
    short_conv (float[B, T, 2, 4] x) => (float[B, T, 2, 4] y) <{_constants(rng)}> {{{_short_conv("x")}
    }}"""
    model = _check_rewrite(
        text,
        [FuseShortConvPass()],
        {"RMSNormalization": 1, "Conv": 1, "Slice": 0, "Gather": 0, "Concat": 0},
        {"x": rng.standard_normal((2, 7, 2, 4)).astype(np.float32)},
    )
    (conv,) = [node for node in model.graph if node.op_type == "Conv"]
    assert list(conv.attributes["pads"].as_ints()) == [4, 0, 0, 0]  # causal: left padding only


def test_fuse_short_conv_refuses_a_conv_that_is_not_causal_after_the_crop():
    rng = np.random.default_rng(5)
    text = f"""{_HEADER}
    short_conv (float[B, T, 2, 4] x) => (float[B, T, 2, 4] y) <{_constants(rng)}> {{{_short_conv("x", "2, 6")}
    }}"""
    model = _model(text)
    assert not FuseShortConvPass()(model).modified
    assert _ops(model)["Slice"] == 1


def test_fuse_gated_conv_after_the_other_passes_on_a_text_graph():
    """The reference block (keys and value from one projection, gates, gated value, short conv) through
    fuse-gating, fuse-short-conv and fuse-gated-conv: one engram.GatedShortConv node, which ONNX Runtime
    runs through its function."""
    rng = np.random.default_rng(6)
    text = f"""{_HEADER}
    block (float[B, T, 12] x, float[B, T, 2, 4] h) => (float[B, T, 2, 4] y) <{_constants(rng)}> {{
        k0, k1, v = Split <axis = -1> (x, sizes){_gates()}
        vu = Unsqueeze(v, ax2)
        gated = Mul(gates, vu){_short_conv("gated")}
    }}"""
    model = _check_rewrite(
        text,
        [FuseGatingPass(), FuseShortConvPass(), FuseGatedConvPass()],
        {"GatedShortConv": 1, "Conv": 0, "RMSNormalization": 0, "Sigmoid": 0},
        _feeds(rng),
    )
    (node,) = [n for n in model.graph if n.op_type == "GatedShortConv"]
    assert node.domain == "engram" and list(node.attributes["dilations"].as_ints()) == [2, 1]
