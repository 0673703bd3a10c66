"""The ``engram.HashGatherFP8`` ONNX operator: DeepSeek-V4.1's hash-gather over an FP8 table.

``HashGatherFP8(input_ids int64 [B,T], token_mask bool [B,T], compress_lut int64 [V],
table uint8 [R,d], scales uint8 [R,d/32]) -> embeddings float32 [B,T,C*d]``
with attributes ``multipliers`` (ints, one per n-gram position), ``primes`` (ints, one per column,
C = len(primes)), ``pad_id`` (int, the *compressed* pad) and ``n_heads`` (int, heads per n-gram order: the config's
``n_head_per_ngram``; the attribute keeps the name that exported files and the extension's ONNX
conversion already use).

The rows are the V4.1 hash (``hash_rows_v41``: the demo's rolling XOR hash plus image-token blocking:
looking back from t, a token is the pad once any position from t back to it is masked or before the
sequence) of the compressed ids, plus the column offsets. ``table`` holds the F8_E4M3 bytes of the
rows and ``scales`` their F8_E8M0 bytes, one per 32 values; column c of a token is
``e4m3(table[row_c]) * 2**(scales[row_c] - 127)`` (each scale repeated over its block of 32), and the C
columns are concatenated. Ids are compressed as in ``engram.HashGather`` (negatives pass through).

Three implementations, bit-exact on the rows and the f32 values:
- a model-local ONNX function of standard ops (``hash_gather_fp8_function``) for ONNX Runtime and
  ``onnx.checker``: int64 hash, uint8 Gathers, decoding through two 256-entry f32 Constants;
- the numpy reference kernel (``HashGatherFP8`` for ``onnx.reference.ReferenceEvaluator``);
- the OpenVINO extension (``openvino/extension/``): ``EngramHash`` with ``blocking=1`` for the rows, then
  the same standard ops, so the table stays the data input of a plain Gather.

``engram.HashGatherBlocked(input_ids, token_mask, compress_lut, table float [R,d]) -> float32 [B,T,C*d]``
(same attributes) is the same hash over a table stored in BF16 or F32 (no scales): the rows gathered in
the table's own type, then cast to float32 (exact). ONNX Runtime's Gather takes BFLOAT16, so its
function body is the hash (``blocked_hash_nodes``, shared with the FP8 op), Gather, Cast and Reshape.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun

from engram_export.models.deepseek_v41_config import e4m3_values, e8m0_values, hash_rows_v41
from engram_export.models.hashing import compress_ids
from engram_export.onnx.op import DOMAIN, MIN_BODY_OPSET, OPSET_VERSION, compression_nodes

__all__ = [
    "FP8_OP_TYPE",
    "FP8_INPUTS",
    "FP8_ATTRIBUTES",
    "BLOCK",
    "hash_gather_fp8_function",
    "hash_gather_fp8_schema",
    "hash_gather_fp8_nodes",
    "HashGatherFP8",
    "BLOCKED_OP_TYPE",
    "BLOCKED_INPUTS",
    "blocked_hash_nodes",
    "hash_gather_blocked_function",
    "HashGatherBlocked",
]

FP8_OP_TYPE = "HashGatherFP8"
FP8_INPUTS = ["input_ids", "token_mask", "compress_lut", "table", "scales"]
FP8_ATTRIBUTES = ["multipliers", "primes", "pad_id", "n_heads"]
BLOCK = 32  # values per E8M0 scale along a table row
BLOCKED_OP_TYPE = "HashGatherBlocked"  # the same hash over a BF16 or F32 table
BLOCKED_INPUTS = FP8_INPUTS[:4]


def _decode_tables() -> tuple[np.ndarray, np.ndarray]:
    return e4m3_values(), e8m0_values()


def _const(name, dtype, values, dims=None) -> onnx.NodeProto:
    values = list(values)
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)] if dims is None else dims, values)
    )


def blocked_hash_nodes(max_ngram_size: int) -> list[onnx.NodeProto]:
    """The V4.1 hash as standard ops, the start of both function bodies: ``input_ids``, ``token_mask``,
    ``compress_lut`` and the node's attributes -> ``rows`` (int64 [B,T,C]). Also defines ``minus1`` and
    ``flat`` ([0, 0, -1]) for the lookup that follows."""
    n, const = helper.make_node, _const
    before = max_ngram_size - 1
    nodes = [
        *compression_nodes(),
        const("minus1", TensorProto.INT64, [-1]),
        const("axis1", TensorProto.INT64, [1]),
        const("true", TensorProto.BOOL, [True], dims=[]),
        # N-1 positions before the sequence: pad ids, and "hit" (masked or before the sequence) = true
        const("pads", TensorProto.INT64, [0, before, 0, 0]),
        n("Pad", ["x", "pads", "pad"], ["padded"]),
        n("Not", ["token_mask"], ["masked"]),
        n("Pad", ["masked", "pads", "true"], ["padded_hit"]),
        n("Shape", ["x"], ["len"], start=1, end=2),
    ]
    mixes = []
    for s in range(max_ngram_size):
        # look-back s: positions t - s = padded[:, N-1-s : N-1-s+T]; blocked_s = hit_0 | ... | hit_s
        blocked = "hit0" if s == 0 else f"blocked{s}"
        nodes += [
            const(f"start{s}", TensorProto.INT64, [before - s]),
            n("Add", [f"start{s}", "len"], [f"end{s}"]),
            n("Slice", ["padded", f"start{s}", f"end{s}", "axis1"], [f"ids{s}"]),
            n("Slice", ["padded_hit", f"start{s}", f"end{s}", "axis1"], [f"hit{s}"]),
        ]
        if s >= 1:
            nodes.append(n("Or", ["hit0" if s == 1 else f"blocked{s - 1}", f"hit{s}"], [blocked]))
        nodes += [
            n("Where", [blocked, "pad", f"ids{s}"], [f"token{s}"]),
            const(f"k{s}", TensorProto.INT64, [s], dims=[]),
            n("Gather", ["mult", f"k{s}"], [f"m{s}"]),
            n("Mul", [f"token{s}", f"m{s}"], [f"p{s}"]),
        ]
        if s >= 1:
            nodes.append(n("BitwiseXor", ["p0" if s == 1 else f"mix{s - 1}", f"p{s}"], [f"mix{s}"]))
            nodes.append(n("Unsqueeze", [f"mix{s}", "minus1"], [f"mix{s}_u"]))
            mixes.append(f"mix{s}_u")
    nodes += [
        n("Concat", mixes, ["mixes"], axis=-1),  # [B,T,N-1]
        n("Unsqueeze", ["mixes", "minus1"], ["mixes4"]),  # [B,T,N-1,1]
        const("per_order", TensorProto.INT64, [before, -1]),
        n("Reshape", ["primes", "per_order"], ["primes2d"]),  # [N-1, heads]
        n("Mod", ["mixes4", "primes2d"], ["hashes4"], fmod=0),  # floor mod, >= 0
        const("flat", TensorProto.INT64, [0, 0, -1]),
        n("Reshape", ["hashes4", "flat"], ["hashes"]),  # [B,T,C]
        n("CumSum", ["primes", "zero"], ["offsets"], exclusive=1),
        n("Add", ["hashes", "offsets"], ["rows"]),
    ]
    return nodes


def hash_gather_fp8_function(max_ngram_size: int, opset: int = MIN_BODY_OPSET) -> onnx.FunctionProto:
    """The operator as an ONNX function of standard ops, for a given n-gram length.

    As ``onnx_op.hash_gather_function``: the body's structure depends only on ``max_ngram_size``, the
    hash constants come from the node's attributes, and ``opset`` must equal the model's default opset.
    The hash (``blocked_hash_nodes``) ends in ``rows`` (int64 [B,T,C]); the FP8 lookup follows.
    """
    n, const = helper.make_node, _const
    e4m3, e8m0 = _decode_tables()
    nodes = [
        *blocked_hash_nodes(max_ngram_size),
        # FP8 lookup: the stored bytes, decoded through 256-entry tables
        n("Gather", ["table", "rows"], ["codes"], axis=0),  # uint8 [B,T,C,d]
        n("Gather", ["scales", "rows"], ["scale_codes"], axis=0),  # uint8 [B,T,C,d/32]
        n("Cast", ["codes"], ["codes32"], to=TensorProto.INT32),
        n("Cast", ["scale_codes"], ["scale_codes32"], to=TensorProto.INT32),
        const("e4m3", TensorProto.FLOAT, e4m3.tolist()),
        const("e8m0", TensorProto.FLOAT, e8m0.tolist()),
        n("Gather", ["e4m3", "codes32"], ["values"], axis=0),
        n("Gather", ["e8m0", "scale_codes32"], ["block_scales"], axis=0),
        const("blocks_shape", TensorProto.INT64, [0, 0, 0, -1, BLOCK]),
        n("Reshape", ["values", "blocks_shape"], ["blocks"]),  # [B,T,C,d/32,32]
        n("Unsqueeze", ["block_scales", "minus1"], ["block_scales5"]),  # [B,T,C,d/32,1]
        n("Mul", ["blocks", "block_scales5"], ["scaled"]),
        n("Reshape", ["scaled", "flat"], ["embeddings"]),  # [B,T,C*d]
    ]
    return helper.make_function(
        DOMAIN,
        FP8_OP_TYPE,
        FP8_INPUTS,
        ["embeddings"],
        nodes,
        [helper.make_opsetid("", max(opset, MIN_BODY_OPSET))],
        attributes=FP8_ATTRIBUTES,
    )


def hash_gather_blocked_function(max_ngram_size: int, opset: int = MIN_BODY_OPSET) -> onnx.FunctionProto:
    """``HashGatherBlocked`` as an ONNX function: the hash, then the table's rows cast to float32."""
    n = helper.make_node
    nodes = [
        *blocked_hash_nodes(max_ngram_size),
        n("Gather", ["table", "rows"], ["gathered"], axis=0),  # stored type [B,T,C,d]
        n("Cast", ["gathered"], ["values"], to=TensorProto.FLOAT),
        n("Reshape", ["values", "flat"], ["embeddings"]),  # [B,T,C*d]
    ]
    return helper.make_function(
        DOMAIN,
        BLOCKED_OP_TYPE,
        BLOCKED_INPUTS,
        ["embeddings"],
        nodes,
        [helper.make_opsetid("", max(opset, MIN_BODY_OPSET))],
        attributes=FP8_ATTRIBUTES,
    )


def hash_gather_fp8_schema() -> onnx.defs.OpSchema:
    """The operator's signature (what onnxscript needs to emit a node of it)."""
    schema = onnx.defs.OpSchema
    attr = schema.AttrType
    return schema(
        FP8_OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc=__doc__,
        inputs=[
            schema.FormalParameter("input_ids", "tensor(int64)"),
            schema.FormalParameter("token_mask", "tensor(bool)"),
            schema.FormalParameter("compress_lut", "tensor(int64)"),
            schema.FormalParameter("table", "tensor(uint8)"),
            schema.FormalParameter("scales", "tensor(uint8)"),
        ],
        outputs=[schema.FormalParameter("embeddings", "tensor(float)")],
        attributes=[
            schema.Attribute("multipliers", attr.INTS, "odd multiplier per n-gram position"),
            schema.Attribute("primes", attr.INTS, "modulus (table size) per column"),
            schema.Attribute("pad_id", attr.INT, "compressed id of blocked positions"),
            schema.Attribute("n_heads", attr.INT, "heads per n-gram order"),
        ],
    )


def hash_gather_fp8_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == FP8_OP_TYPE]


class HashGatherFP8(OpRun):
    """The numpy reference kernel, for ``ReferenceEvaluator(model, new_ops=[HashGatherFP8])``."""

    op_domain = DOMAIN

    def _run(
        self,
        input_ids,
        token_mask,
        compress_lut,
        table,
        scales,
        multipliers=None,
        primes=None,
        pad_id=None,
        n_heads=None,
    ):

        e4m3, e8m0 = _decode_tables()
        rows = hash_rows_v41(
            compress_ids(input_ids, np.asarray(compress_lut)), token_mask, multipliers, primes, pad_id, n_heads
        )
        values = e4m3[np.asarray(table)[rows]]  # [B,T,C,d]
        block_scales = e8m0[np.asarray(scales)[rows]]  # [B,T,C,d/32]
        scaled = values.reshape(*block_scales.shape, BLOCK) * block_scales[..., None]
        return (scaled.reshape(*rows.shape[:2], -1).astype(np.float32),)


class HashGatherBlocked(OpRun):
    """The numpy reference kernel of ``HashGatherBlocked``. A BF16 table arrives as ``ml_dtypes.bfloat16``
    (what ``onnx.numpy_helper`` gives), whose cast to float32 is exact."""

    op_domain = DOMAIN

    def _run(
        self, input_ids, token_mask, compress_lut, table, multipliers=None, primes=None, pad_id=None, n_heads=None
    ):

        rows = hash_rows_v41(
            compress_ids(input_ids, np.asarray(compress_lut)), token_mask, multipliers, primes, pad_id, n_heads
        )
        return (np.asarray(table)[rows].astype(np.float32).reshape(*rows.shape[:2], -1),)
