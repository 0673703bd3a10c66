"""Every kernel of the hash-gather operator gives bit-identical row indices, whatever the ids.

Kernels: the numpy reference (``hash_rows``, also behind ``ReferenceEvaluator``), the ONNX function
body in ONNX Runtime, and the OpenVINO extension op on CPU, where a plain i64 decomposition would be
silently wrong (the CPU plugin computes i64 in i32).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import openvino as ov
import pytest
from onnx import TensorProto, helper

from engram_export.models.config import load_config
from engram_export.models.hashing import INT32_MIN, EngramHashing, _next_prime
from engram_export.onnx import op as onnx_op
from engram_export.openvino.extension import openvino_core

TINY = load_config("tiny")
CONFIGS = {
    "tiny": TINY,
    # vocab 7: multipliers ~2^59, so negative ids' products wrap around int64
    "huge-multipliers": TINY.replace(vocab_size=7, pad_id=3, engram_vocab_size=(100_003, 200_003)),
    # primes just under 2^31 (hashing_for below): the mod and the offsets need full 64-bit arithmetic
    "int32-primes": TINY.replace(n_head_per_ngram=2, n_embed_per_ngram=8),
    "five-gram": TINY.replace(max_ngram_size=5, engram_vocab_size=(61, 67, 71, 73), layer_ids=(0,)),
}


def hashing_for(name: str) -> EngramHashing:
    """The config's hashing; for ``int32-primes``, head primes just under 2**31. No config may have
    such a table (its rows would not fit an index of the runtimes), but the kernels must still hash
    exactly with any prime below 2**31."""
    hashing = EngramHashing(CONFIGS[name])
    if name == "int32-primes":
        seen, primes = set(), []
        for start in (2**31 - 400, 2**31 - 400, 2**31 - 200, 2**31 - 200):
            primes.append(_next_prime(start - 1, seen))
            seen.add(primes[-1])
        hashing.__dict__["_primes_by_layer"] = {layer: primes for layer in CONFIGS[name].layer_ids}
    return hashing


def hash_gather_model(
    config, layer_id: int, table: np.ndarray, rows_only: bool, hashing: EngramHashing | None = None
) -> onnx.ModelProto:
    """A one-node model; with ``rows_only`` its function returns the row indices, not the lookup."""
    hashing = hashing or EngramHashing(config)
    function = onnx_op.hash_gather_function(config.max_ngram_size, 18)
    if rows_only:
        del function.node[-2:]  # the table Gather and the final Reshape
        function.output[0] = "rows"
    node = helper.make_node(
        onnx_op.OP_TYPE,
        ["input_ids", "compress_lut", "table"],
        ["out"],
        domain=onnx_op.DOMAIN,
        multipliers=hashing.multipliers(layer_id),
        primes=hashing.primes(layer_id),
        pad_id=hashing.pad_id,
        n_head_per_ngram=config.n_head_per_ngram,
    )
    graph = helper.make_graph(
        [node],
        "hash",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.INT64 if rows_only else TensorProto.FLOAT, ["B", "T", "W"])],
        [onnx.numpy_helper.from_array(hashing.lut, "compress_lut"), onnx.numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(
        graph,
        functions=[function],
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(onnx_op.DOMAIN, 1)],
    )


def adversarial_ids(num_ids: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_ids, size=(4, 23), dtype=np.int64)
    ids[0, :6] = [num_ids - 1, 0, -1, INT32_MIN, -(2**20), num_ids - 1]
    ids[1, ::3] = -7
    ids[2] = num_ids - 1
    return ids


def ort_rows(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def openvino_rows(model: onnx.ModelProto, ids: np.ndarray, tmp_path) -> np.ndarray:
    path = tmp_path / "hash.onnx"
    onnx.save(model, path)
    full = openvino_core().read_model(str(path))
    (hash_op,) = [op for op in full.get_ops() if op.get_type_name() == "EngramHash"]
    rows_model = ov.Model([hash_op.output(0)], full.get_parameters())
    compiled = openvino_core().compile_model(rows_model, "CPU")
    return compiled({"input_ids": ids})[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_row_indices_are_bit_exact_in_every_kernel(name, tmp_path):
    config = CONFIGS[name]
    hashing = hashing_for(name)
    layer_id = config.layer_ids[-1]
    ids = adversarial_ids(len(hashing.lut))
    expected = hashing.rows(ids, layer_id)
    model = hash_gather_model(config, layer_id, np.zeros((1, 1), np.float32), rows_only=True, hashing=hashing)
    np.testing.assert_array_equal(ort_rows(model, ids), expected)
    np.testing.assert_array_equal(openvino_rows(model, ids, tmp_path).astype(np.int64), expected)
    if name == "int32-primes":
        assert expected.max() > 2**31  # offsets past int32: the op's output is i64
        assert expected[..., 0].max() > 2**30


@pytest.mark.parametrize("name", ["tiny", "huge-multipliers", "five-gram"])
def test_lookup_is_exact_in_every_runtime(name, tmp_path):
    """The whole operator, hash and Gather, with a table whose values are their own row index."""
    from onnx.reference import ReferenceEvaluator

    config = CONFIGS[name]
    hashing = EngramHashing(config)
    layer_id = config.layer_ids[-1]
    rows = hashing.table_rows(layer_id)
    table = np.repeat(np.arange(rows, dtype=np.float32)[:, None], 2, axis=1)
    model = hash_gather_model(config, layer_id, table, rows_only=False)
    onnx.checker.check_model(model, full_check=True)
    ids = adversarial_ids(len(hashing.lut), seed=1)
    expected = np.repeat(hashing.rows(ids, layer_id), 2, axis=-1).astype(np.float32)
    np.testing.assert_array_equal(ort_rows(model, ids), expected)
    evaluator = ReferenceEvaluator(model, new_ops=[onnx_op.HashGather])
    np.testing.assert_array_equal(evaluator.run(None, {"input_ids": ids})[0], expected)
    path = tmp_path / "lookup.onnx"
    onnx.save(model, path)
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_array_equal(compiled({"input_ids": ids})[0], expected)


def test_plain_i64_decomposition_is_wrong_on_openvino_cpu(tmp_path):
    """Why the extension exists: the standard-op function body, run by the CPU plugin, is wrong."""
    config = CONFIGS["huge-multipliers"]
    model = hash_gather_model(config, 3, np.zeros((1, 1), np.float32), rows_only=True)
    inlined = onnx.inliner.inline_local_functions(model)
    path = tmp_path / "inlined.onnx"
    onnx.save(inlined, path)
    compiled = ov.Core().compile_model(str(path), "CPU")
    ids = adversarial_ids(7)
    assert not np.array_equal(compiled({"input_ids": ids})[0], EngramHashing(config).rows(ids, 3))
