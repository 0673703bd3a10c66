"""DeepSeek-V4.1 Engram layers to ONNX, with the FP8 tensors left in the checkpoint's own bytes.

The graph is built directly (the layer is a handful of standard ops around one
``engram.HashGatherFP8`` node): tracing would need the 94 GiB table as a tensor. The table, ``wkv``
and their scales are external data *of the checkpoint shard itself*: OpenVINO's ONNX reader refuses data outside
the model's folder, so the shard is hard-linked beside the .onnx (same inode: no copy, no disk) and
the initializers point at the tensors' byte offsets in it. Across file systems a hard link is
impossible: the export refuses, or copies the shard when asked (``WriteOptions.copy_table``).

Graph: ``e = HashGatherFP8(ids, mask, lut, table, scales)`` [B,T,C*d] (a BF16 or F32 table, which has
no scales: ``HashGatherBlocked(ids, mask, lut, table)``, the table an initializer of its stored type);
``kv = e @ W^T`` with W the FP8 ``wkv`` dequantized by standard ops (32x32 block scales; folded to a
constant by the runtimes); the gate from unweighted RMS norms of h and key, ``q_weight * k_weight``
and a signed square root; ``output = where(mask, h + gate * value, h)``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engram_export.contract.model_info import ModelInfo, record_external_data
from engram_export.core import progress
from engram_export.core.fileio import DEFAULT_WRITE, WriteOptions, check_output_file, staged_output
from engram_export.core.integrity import lfs_sha256
from engram_export.models.deepseek_v41_config import V41Hashing, e4m3_values, e8m0_values, locate_layer
from engram_export.onnx.op import DOMAIN, OPSET_VERSION
from engram_export.onnx.op_fp8 import (
    BLOCKED_OP_TYPE,
    FP8_OP_TYPE,
    hash_gather_blocked_function,
    hash_gather_fp8_function,
)

__all__ = ["build_v41_model", "export_v41_layer"]

OPSET, IR_VERSION = 23, 11


# checkpoint dtype -> initializer type: FP8 codes as their bytes (ONNX Runtime cannot Gather FP8)
ONNX_TYPES = {
    "F8_E4M3": TensorProto.UINT8,
    "F8_E8M0": TensorProto.UINT8,
    "BF16": TensorProto.BFLOAT16,
    "F32": TensorProto.FLOAT,
}


def _external(name: str, location, file_name: str) -> TensorProto:
    """An initializer whose bytes stay in the (linked) shard, at the tensor's offset."""
    tensor = TensorProto(name=name, data_type=ONNX_TYPES[location.dtype], dims=list(location.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", file_name), ("offset", location.offset), ("length", location.nbytes)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def build_v41_model(
    config, layer_id: int, located: dict, small: dict, hashing, shard_names: dict[str, str]
) -> onnx.ModelProto:
    """The layer's ONNX model. ``located``: tensor suffix -> ``TensorLocation``; ``small``: the loaded
    q/k weights; ``shard_names``: suffix -> the linked shard holding it (``SHARD_TENSORS``)."""
    streams, hidden = config.hc_mult, config.hidden_size
    out_width, in_width = config.projection_width, config.engram_hidden_size
    blocks_out, blocks_in = located["wkv.scale"].shape
    gate_weight = (small["q_weight"].float() * small["k_weight"].float()).numpy()  # exact in f32
    const = numpy_helper.from_array
    initializers = [
        const(hashing.lut.astype(np.int64), "compress_lut"),
        *(
            _external(name, located[suffix], shard_names[suffix])
            for suffix, name in SHARD_TENSORS.items()
            if suffix in located
        ),
        const(e4m3_values(), "e4m3_values"),
        const(e8m0_values(), "e8m0_values"),
        const(gate_weight.astype(np.float32), "gate_weight"),
        const(np.array([blocks_out, BLOCK_ROWS, blocks_in, BLOCK_ROWS], np.int64), "block_grid"),
        const(np.array([blocks_out * BLOCK_ROWS, blocks_in * BLOCK_ROWS], np.int64), "block_full"),
        const(np.array([0, 0], np.int64), "zeros2"),
        const(np.array([out_width, in_width], np.int64), "wkv_shape"),
        const(np.array([0, 1], np.int64), "axes01"),
        const(np.array([1, 3], np.int64), "axes13"),
        const(np.array([0], np.int64), "start"),
        const(np.array([streams * hidden], np.int64), "key_end"),
        const(np.array([out_width], np.int64), "value_end"),
        const(np.array([2], np.int64), "axis2"),
        const(np.array([-1], np.int64), "last"),
        const(np.array([2, 3], np.int64), "axes23"),
        const(np.array([0, 0, streams, hidden], np.int64), "key_shape"),
        const(np.array(config.rms_norm_eps, np.float32), "eps"),
        const(np.array(1 / math.sqrt(hidden), np.float32), "inv_sqrt_hidden"),
        const(np.array(1e-6, np.float32), "gate_floor"),
    ]
    fp8 = "embed.scale" in located
    op_type, function = (
        (FP8_OP_TYPE, hash_gather_fp8_function) if fp8 else (BLOCKED_OP_TYPE, hash_gather_blocked_function)
    )
    n = helper.make_node
    nodes = [
        n(
            op_type,
            ["input_ids", "token_mask", "compress_lut", "table", *(["table_scale"] if fp8 else [])],
            ["embeddings"],
            domain=DOMAIN,
            multipliers=hashing.multipliers(layer_id),
            primes=hashing.primes(layer_id),
            pad_id=hashing.pad_id,
            n_heads=config.n_head_per_ngram,
        ),
        # W = e4m3(wkv) * e8m0(scale) per 32x32 block: constant, folded by the runtimes
        n("Cast", ["wkv"], ["wkv_index"], to=TensorProto.INT32),
        n("Gather", ["e4m3_values", "wkv_index"], ["wkv_values"]),
        n("Cast", ["wkv_scale"], ["wkv_scale_index"], to=TensorProto.INT32),
        n("Gather", ["e8m0_values", "wkv_scale_index"], ["block_scales"]),
        n("Unsqueeze", ["block_scales", "axes13"], ["block_scales_4d"]),
        n("Expand", ["block_scales_4d", "block_grid"], ["scales_grid"]),
        n("Reshape", ["scales_grid", "block_full"], ["scales_full"]),
        n("Slice", ["scales_full", "zeros2", "wkv_shape", "axes01"], ["scales"]),
        n("Mul", ["wkv_values", "scales"], ["wkv_float"]),
        n("Transpose", ["wkv_float"], ["wkv_t"], perm=[1, 0]),
        n("MatMul", ["embeddings", "wkv_t"], ["kv"]),
        n("Slice", ["kv", "start", "key_end", "axis2"], ["key_flat"]),
        n("Reshape", ["key_flat", "key_shape"], ["key"]),
        n("Slice", ["kv", "key_end", "value_end", "axis2"], ["value_flat"]),
        n("Unsqueeze", ["value_flat", "axis2"], ["value"]),
        # rstd = rsqrt(mean(h^2) + eps) * rsqrt(mean(key^2) + eps)
        n("Mul", ["hidden_states", "hidden_states"], ["h_sq"]),
        n("ReduceMean", ["h_sq", "last"], ["h_ms"], keepdims=0),
        n("Add", ["h_ms", "eps"], ["h_ms_eps"]),
        n("Sqrt", ["h_ms_eps"], ["h_rms"]),
        n("Mul", ["key", "key"], ["k_sq"]),
        n("ReduceMean", ["k_sq", "last"], ["k_ms"], keepdims=0),
        n("Add", ["k_ms", "eps"], ["k_ms_eps"]),
        n("Sqrt", ["k_ms_eps"], ["k_rms"]),
        n("Mul", ["h_rms", "k_rms"], ["rms_product"]),
        n("Reciprocal", ["rms_product"], ["rstd"]),
        # dot = sum(h * w * key) * rstd / sqrt(hidden); gate = sigmoid(sign(dot) sqrt(max(|dot|, 1e-6)))
        n("Mul", ["hidden_states", "gate_weight"], ["h_w"]),
        n("Mul", ["h_w", "key"], ["h_w_key"]),
        n("ReduceSum", ["h_w_key", "last"], ["dot_raw"], keepdims=0),
        n("Mul", ["dot_raw", "rstd"], ["dot_norm"]),
        n("Mul", ["dot_norm", "inv_sqrt_hidden"], ["dot"]),
        n("Abs", ["dot"], ["dot_abs"]),
        n("Max", ["dot_abs", "gate_floor"], ["dot_floor"]),
        n("Sqrt", ["dot_floor"], ["dot_root"]),
        n("Sign", ["dot"], ["dot_sign"]),
        n("Mul", ["dot_sign", "dot_root"], ["gate_logit"]),
        n("Sigmoid", ["gate_logit"], ["gate"]),
        n("Unsqueeze", ["gate", "last"], ["gate_4d"]),
        n("Mul", ["gate_4d", "value"], ["gated"]),
        n("Add", ["hidden_states", "gated"], ["fused"]),
        # image tokens: exactly h
        n("Unsqueeze", ["token_mask", "axes23"], ["mask_4d"]),
        n("Where", ["mask_4d", "fused", "hidden_states"], ["output"]),
    ]
    dims = ["batch", "tokens"]
    graph = helper.make_graph(
        nodes,
        f"deepseek_v41_engram_layer_{layer_id}",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
            helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [*dims, streams, hidden]),
            helper.make_tensor_value_info("token_mask", TensorProto.BOOL, dims),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [*dims, streams, hidden])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[function(config.max_ngram_size, OPSET)],
        producer_name="engram-export",
    )
    model.ir_version = IR_VERSION
    info = ModelInfo(config, layer_id, len(hashing.lut))
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in info.to_metadata().items())
    return model


BLOCK_ROWS = 32
# checkpoint tensor -> initializer left in the (linked) shard: the table, the FP8 wkv, their scales (a
# BF16 or F32 table has none)
SHARD_TENSORS = {"embed.weight": "table", "embed.scale": "table_scale", "wkv.weight": "wkv", "wkv.scale": "wkv_scale"}


def export_v41_layer(
    checkpoint, config, layer_id: int, output: str | Path, hashing=None, write: WriteOptions = DEFAULT_WRITE
) -> Path:
    """Write layer ``layer_id`` of ``checkpoint`` to ``output`` (.onnx) with the shard(s) holding its
    table hard-linked beside it as ``<output>.<shard name>``."""
    output = check_output_file(output, ".onnx")
    hashing = hashing or V41Hashing(config)
    located = locate_layer(checkpoint, config, layer_id)
    small = {suffix: checkpoint.load(located[suffix].name) for suffix in ("q_weight", "k_weight")}
    with staged_output(output) as staged:
        shard_names: dict[str, str] = {}
        known_sha256: dict[str, str] = {}
        for suffix in filter(located.__contains__, SHARD_TENSORS):
            shard = located[suffix].file
            name = f"{output.stem}.{shard.name}"
            if not os.path.lexists(staged.parent / name):
                write.place_table(shard, staged.parent / name)
                if digest := lfs_sha256(shard):  # a Hugging Face cache names the blob by its SHA-256
                    known_sha256[name] = digest
            shard_names[suffix] = name
        model = build_v41_model(config, layer_id, located, small, hashing, shard_names)
        record_external_data(model, staged.parent, known_sha256)
        with progress.stage(f"writing {output.name}"):
            onnx.save(model, str(staged))
    return output
