"""The ``engram.HashGather`` ONNX operator: its definition, its exporter translation, its reference kernel.

``HashGather(input_ids int64 [B,T], compress_lut int64 [V], table float [R,d]) -> embeddings [B,T,H*d]``
with attributes ``multipliers`` (ints, one per n-gram position), ``primes`` (ints, one per head),
``pad_id`` (int, the compressed pad) and ``n_head_per_ngram`` (int).

Three implementations, all bit-exact on the row indices:
- a model-local ONNX function of standard int64 ops (``hash_gather_function``), which ONNX Runtime
  and ``onnx.checker`` use: the file runs anywhere with no custom-op library;
- the numpy reference kernel (``HashGatherOp`` for ``onnx.reference.ReferenceEvaluator``);
- the OpenVINO C++ extension (``openvino/extension/``), since OpenVINO's CPU plugin runs i64 math in i32 and
  would silently break the function's decomposition.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun
from onnxscript import values

from engram_export.models.hashing import hash_rows

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "OPSET_VERSION",
    "hash_gather_function",
    "translation_table",
    "HashGather",
    "hash_gather_nodes",
    "GATED_CONV_OP_TYPE",
    "gated_short_conv_function",
]

DOMAIN = "engram"
OP_TYPE = "HashGather"
OPSET_VERSION = 1
MIN_BODY_OPSET = 18  # BitwiseXor
MIN_GATED_CONV_OPSET = 23  # RMSNormalization


def _ref_attr(node: onnx.NodeProto, name: str, ref: str, kind: onnx.AttributeProto.AttributeType) -> onnx.NodeProto:
    node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=ref, type=kind))
    return node


def compression_nodes() -> list[onnx.NodeProto]:
    """The start of every hash-gather function body: the constants ``zero``, ``pad``, ``mult`` and
    ``primes`` (the last three read from the node's attributes) and the compressed ids ``x``
    (``compress_lut[id]`` for id >= 0; negatives pass through)."""
    ints, one = onnx.AttributeProto.INTS, onnx.AttributeProto.INT
    n = helper.make_node
    return [
        n("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        _ref_attr(n("Constant", [], ["pad"]), "value_int", "pad_id", one),
        _ref_attr(n("Constant", [], ["mult"]), "value_ints", "multipliers", ints),
        _ref_attr(n("Constant", [], ["primes"]), "value_ints", "primes", ints),
        n("GreaterOrEqual", ["input_ids", "zero"], ["is_token"]),
        n("Max", ["input_ids", "zero"], ["safe_ids"]),
        n("Gather", ["compress_lut", "safe_ids"], ["looked_up"]),
        n("Where", ["is_token", "looked_up", "input_ids"], ["x"]),
    ]


def hash_gather_function(max_ngram_size: int, opset: int = MIN_BODY_OPSET) -> onnx.FunctionProto:
    """The operator as an ONNX function of standard ops, for a given n-gram length.

    The body's structure depends only on ``max_ngram_size``; the hash constants are read from the
    node's attributes, so every layer of a model shares the one function. ``opset`` must equal the
    model's default opset (the checker requires it).
    """
    orders = max_ngram_size - 1
    n = helper.make_node
    nodes = [
        *compression_nodes(),
        # left-pad with the pad id, then s_k = padded[:, N-1-k : N-1-k+T]
        n(
            "Constant",
            [],
            ["pads"],
            value=helper.make_tensor("pads", TensorProto.INT64, [4], [0, max_ngram_size - 1, 0, 0]),
        ),
        n("Pad", ["x", "pads", "pad"], ["padded"]),
        n("Shape", ["x"], ["len"], start=1, end=2),
        n("Constant", [], ["axis1"], value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])),
    ]
    mixes = []
    for k in range(max_ngram_size):
        start = max_ngram_size - 1 - k
        nodes += [
            n("Constant", [], [f"start{k}"], value=helper.make_tensor(f"start{k}", TensorProto.INT64, [1], [start])),
            n("Add", [f"start{k}", "len"], [f"end{k}"]),
            n("Slice", ["padded", f"start{k}", f"end{k}", "axis1"], [f"s{k}"]),
            n("Constant", [], [f"k{k}"], value=helper.make_tensor(f"k{k}", TensorProto.INT64, [], [k])),
            n("Gather", ["mult", f"k{k}"], [f"m{k}"]),
            n("Mul", [f"s{k}", f"m{k}"], [f"p{k}"]),
        ]
        if k == 1:
            nodes.append(n("BitwiseXor", ["p0", "p1"], ["mix1"]))
        elif k > 1:
            nodes.append(n("BitwiseXor", [f"mix{k - 1}", f"p{k}"], [f"mix{k}"]))
        if k >= 1:
            nodes.append(n("Unsqueeze", [f"mix{k}", "minus1"], [f"mix{k}_u"]))
            mixes.append(f"mix{k}_u")
    nodes.insert(0, n("Constant", [], ["minus1"], value=helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])))
    nodes += [
        n("Concat", mixes, ["mixes"], axis=-1),  # [B,T,N-1]
        n("Unsqueeze", ["mixes", "minus1"], ["mixes4"]),  # [B,T,N-1,1]
        n("Constant", [], ["per_order"], value=helper.make_tensor("per_order", TensorProto.INT64, [2], [orders, -1])),
        n("Reshape", ["primes", "per_order"], ["primes2d"]),  # [N-1, heads]
        n("Mod", ["mixes4", "primes2d"], ["hashes4"], fmod=0),  # floor mod, >= 0
        n("Constant", [], ["flat_heads"], value=helper.make_tensor("flat_heads", TensorProto.INT64, [3], [0, 0, -1])),
        n("Reshape", ["hashes4", "flat_heads"], ["hashes"]),  # [B,T,H]
        n("CumSum", ["primes", "zero"], ["offsets"], exclusive=1),
        n("Add", ["hashes", "offsets"], ["rows"]),
        n("Gather", ["table", "rows"], ["rows_embedded"], axis=0),  # [B,T,H,d]
        n("Reshape", ["rows_embedded", "flat_heads"], ["embeddings"]),  # [B,T,H*d]
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        ["input_ids", "compress_lut", "table"],
        ["embeddings"],
        nodes,
        [helper.make_opsetid("", max(opset, MIN_BODY_OPSET))],
        attributes=["multipliers", "primes", "pad_id", "n_head_per_ngram"],
    )


def hash_gather_schema() -> onnx.defs.OpSchema:
    """The operator's signature (what onnxscript needs to emit a node of it)."""
    schema = onnx.defs.OpSchema
    attr = schema.AttrType
    return schema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc=__doc__,
        inputs=[
            schema.FormalParameter("input_ids", "tensor(int64)"),
            schema.FormalParameter("compress_lut", "tensor(int64)"),
            schema.FormalParameter("table", "T"),
        ],
        outputs=[schema.FormalParameter("embeddings", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "table and embedding type")],
        attributes=[
            schema.Attribute("multipliers", attr.INTS, "odd multiplier per n-gram position"),
            schema.Attribute("primes", attr.INTS, "modulus (table size) per head"),
            schema.Attribute("pad_id", attr.INT, "compressed id padding the left edge"),
            schema.Attribute("n_head_per_ngram", attr.INT, "heads per n-gram order"),
        ],
    )


GATED_CONV_OP_TYPE = "GatedShortConv"


def gated_short_conv_function(opset: int) -> onnx.FunctionProto:
    """``engram.GatedShortConv(proj, hidden, scales, conv_weight) -> output [B,T,G,D]``: everything after
    the fused projection, as standard ops (what ``passes/fuse_gated_conv.py`` replaces).

    ``proj`` [B,T,(G+1)*D] holds the G keys then the value; ``scales`` [G,D] is norm1 * norm2;
    ``conv_weight`` [G*D,1,K,1] has the short-conv norms folded in. Attributes: ``eps_key``,
    ``eps_query``, ``eps_conv``, ``score_scale`` (sqrt D), ``floor`` (of |score|), ``channels`` (G*D),
    ``dilations`` and ``pads`` of the causal conv over [B, G*D, T, 1].
    """
    floats, ints, one = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INTS, onnx.AttributeProto.INT)
    n = helper.make_node

    def ints_const(name, values):
        return n("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def rms(x, eps_attr, out):
        return _ref_attr(n("RMSNormalization", [x, "ones"], [out], axis=-1), "epsilon", eps_attr, floats)

    nodes = [
        n("Shape", ["hidden"], ["hidden_shape"]),
        n("Shape", ["hidden"], ["dim"], start=3, end=4),
        n("Shape", ["proj"], ["width"], start=2, end=3),
        n("Sub", ["width", "dim"], ["keys_width"]),
        n("Concat", ["keys_width", "dim"], ["sizes"], axis=0),
        n("Split", ["proj", "sizes"], ["keys_flat", "value"], axis=-1),
        n("Reshape", ["keys_flat", "hidden_shape"], ["keys"]),
        n("ConstantOfShape", ["dim"], ["ones"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        rms("keys", "eps_key", "keys_normed"),
        rms("hidden", "eps_query", "query_normed"),
        n("Mul", ["keys_normed", "query_normed"], ["product"]),
        n("Mul", ["product", "scales"], ["scaled"]),
        ints_const("last_axis", [-1]),
        n("ReduceSum", ["scaled", "last_axis"], ["dot"], keepdims=1),
        _ref_attr(n("Constant", [], ["score_scale"]), "value_float", "score_scale", floats),
        n("Div", ["dot", "score_scale"], ["score"]),
        _ref_attr(n("Constant", [], ["floor"]), "value_float", "floor", floats),
        n("Abs", ["score"], ["magnitude"]),
        n("Clip", ["magnitude", "floor"], ["clipped"]),
        n("Sqrt", ["clipped"], ["root"]),
        n("Sign", ["score"], ["sign"]),
        n("Mul", ["root", "sign"], ["signed_root"]),
        n("Sigmoid", ["signed_root"], ["gate"]),
        ints_const("axis2", [2]),
        n("Unsqueeze", ["value", "axis2"], ["value4"]),
        n("Mul", ["gate", "value4"], ["gated"]),
        rms("gated", "eps_conv", "gated_normed"),
        ints_const("columns_shape", [0, 0, 1, -1]),
        n("Reshape", ["gated_normed", "columns_shape"], ["columns_flat"]),
        n("Transpose", ["columns_flat"], ["columns"], perm=[0, 3, 1, 2]),
        _ref_attr(
            _ref_attr(
                _ref_attr(n("Conv", ["columns", "conv_weight"], ["mixed"]), "group", "channels", one),
                "dilations",
                "dilations",
                ints,
            ),
            "pads",
            "pads",
            ints,
        ),
        n("Sigmoid", ["mixed"], ["mixed_sigmoid"]),
        n("Mul", ["mixed", "mixed_sigmoid"], ["activated"]),
        n("Transpose", ["activated"], ["activated_rows"], perm=[0, 2, 3, 1]),
        n("Reshape", ["activated_rows", "hidden_shape"], ["conv_out"]),
        n("Add", ["gated", "conv_out"], ["output"]),
    ]
    return helper.make_function(
        DOMAIN,
        GATED_CONV_OP_TYPE,
        ["proj", "hidden", "scales", "conv_weight"],
        ["output"],
        nodes,
        [helper.make_opsetid("", max(opset, MIN_GATED_CONV_OPSET))],
        attributes=["eps_key", "eps_query", "eps_conv", "score_scale", "floor", "channels", "dilations", "pads"],
    )


def translation_table() -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export``: the torch op -> one ONNX node."""
    hash_gather_op = values.Op(values.Opset(DOMAIN, OPSET_VERSION), OP_TYPE, hash_gather_schema())

    def hash_gather(input_ids, compress_lut, table, multipliers, primes, pad_id, n_head_per_ngram):
        return hash_gather_op(
            input_ids,
            compress_lut,
            table,
            multipliers=multipliers,
            primes=primes,
            pad_id=pad_id,
            n_head_per_ngram=n_head_per_ngram,
        )

    return {torch.ops.engram_export.hash_gather.default: hash_gather}


def hash_gather_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


class HashGather(OpRun):
    """The numpy reference kernel, for ``ReferenceEvaluator(model, new_ops=[HashGather])``."""

    op_domain = DOMAIN

    def _run(self, input_ids, compress_lut, table, multipliers=None, primes=None, pad_id=None, n_head_per_ngram=None):
        rows = hash_rows(input_ids, compress_lut, multipliers, primes, pad_id, n_head_per_ngram)
        embedded = np.asarray(table)[rows]
        return (embedded.reshape(*rows.shape[:2], -1),)
