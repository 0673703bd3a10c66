"""DeepSeek-V4.1's hash-gather in every kernel: bit-exact rows and bit-exact f32 embeddings.

Kernels: ``EngramHash`` with ``blocking=1`` in the OpenVINO extension (rows, with and without decode
history) against the numpy reference ``hash_rows_v41``, with the released model's constants; and the
``engram.HashGatherFP8`` ONNX op in ONNX Runtime (its function body), the ReferenceEvaluator (its
OpRun) and OpenVINO (the extension's converter), all giving the same float32 values as a numpy lookup.
``blocking=0`` stays the demo hash, and IRs written before ``blocking`` existed still read.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import openvino as ov
import pytest
from onnx import TensorProto, helper

from engram_export.models.deepseek_v41_config import V41Config, V41Hashing, e4m3_values, e8m0_values, hash_rows_v41
from engram_export.models.hashing import hash_rows
from engram_export.onnx import op as onnx_op
from engram_export.onnx import op_fp8 as onnx_op_fp8
from engram_export.openvino.extension import HASH_OP_TYPE, openvino_core
from tests.v41_spec import RELEASED, TINY

RAW_VOCAB = 1000  # raw ids of the tests; the compression table maps them into the config's ids


def released_constants(layer_id: int = 1):
    hashing = V41Hashing(V41Config.from_hf(RELEASED))
    return hashing.multipliers(layer_id), hashing.primes(layer_id), hashing.config


def test_released_constants_are_the_spec_ones():
    multipliers, primes, _ = released_constants()
    assert multipliers == [76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert len(primes) == 24 and min(primes) > 16_000_000


def random_lut(compressed_size: int, seed: int = 0) -> np.ndarray:
    lut = np.random.default_rng(seed).integers(0, compressed_size, RAW_VOCAB, dtype=np.int64)
    lut[:4] = compressed_size - 1  # the largest products
    return lut


def random_inputs(batch: int = 6, length: int = 17, seed: int = 0):
    """Ids and masks that hit every blocking case: random, all masked, none masked, the first token
    masked, only the last masked, alternating."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, RAW_VOCAB, (batch, length), dtype=np.int64)
    ids[0, :5] = [0, 1, 2, 3, RAW_VOCAB - 1][:length]
    mask = rng.random((batch, length)) > 0.3
    mask[1] = False
    mask[2] = True
    mask[3, 0] = False
    mask[4] = True
    mask[4, -1] = False
    mask[5] = np.arange(length) % 2 == 0
    return ids, mask


def fp8_model(multipliers, primes, pad, n_heads, lut, table, scales, rows_only=False) -> onnx.ModelProto:
    """One HashGatherFP8 node; with ``rows_only`` its function stops at the row indices."""
    function = onnx_op_fp8.hash_gather_fp8_function(len(multipliers), 18)
    if rows_only:
        cut = next(i for i, node in enumerate(function.node) if "rows" in node.output)
        del function.node[cut + 1 :]
        function.output[0] = "rows"
    node = helper.make_node(
        onnx_op_fp8.FP8_OP_TYPE,
        onnx_op_fp8.FP8_INPUTS,
        ["out"],
        domain=onnx_op.DOMAIN,
        multipliers=list(multipliers),
        primes=list(primes),
        pad_id=int(pad),
        n_heads=n_heads,
    )
    graph = helper.make_graph(
        [node],
        "hash_fp8",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("token_mask", TensorProto.BOOL, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.INT64 if rows_only else TensorProto.FLOAT, ["B", "T", "W"])],
        [
            onnx.numpy_helper.from_array(lut, "compress_lut"),
            onnx.numpy_helper.from_array(table, "table"),
            onnx.numpy_helper.from_array(scales, "scales"),
        ],
    )
    return helper.make_model(
        graph,
        functions=[function],
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(onnx_op.DOMAIN, 1)],
    )


def rows_model(multipliers, primes, pad, n_heads, lut) -> onnx.ModelProto:
    dummy_table, dummy_scales = np.zeros((1, 32), np.uint8), np.zeros((1, 1), np.uint8)
    return fp8_model(multipliers, primes, pad, n_heads, lut, dummy_table, dummy_scales, rows_only=True)


def read_hash_op(model: onnx.ModelProto, tmp_path):
    """The ONNX file read by OpenVINO: (its EngramHash node, its parameters by name)."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    full = openvino_core().read_model(str(path))
    (hash_op,) = [op for op in full.get_ops() if op.get_type_name() == HASH_OP_TYPE]
    return hash_op, {p.get_friendly_name(): p for p in full.get_parameters()}


def ov_hash_rows(hash_op, parameters, inputs: dict) -> np.ndarray:
    model = ov.Model([hash_op.output(0)], [parameters[name] for name in inputs])
    compiled = openvino_core().compile_model(model, "CPU")
    return compiled(inputs)[0].astype(np.int64)


def with_history(hash_op, parameters, before: int):
    """The op with decode-state inputs history_ids [B, N-1] and history_mask [B, N-1] added."""
    history_ids = ov.opset13.parameter([-1, before], ov.Type.i64, name="history_ids")
    history_mask = ov.opset13.parameter([-1, before], ov.Type.boolean, name="history_mask")
    hash_op.set_arguments([*hash_op.input_values(), history_ids.output(0), history_mask.output(0)])
    hash_op.validate_and_infer_types()
    return {**parameters, "history_ids": history_ids, "history_mask": history_mask}


@pytest.mark.parametrize("layer_id", [1, 14])
def test_blocking_rows_are_bit_exact_with_released_constants(layer_id, tmp_path):
    multipliers, primes, config = released_constants(layer_id)
    lut = random_lut(config.compressed_vocab_size)
    pad = int(lut[config.pad_id])
    ids, mask = random_inputs()
    expected = hash_rows_v41(lut[ids], mask, multipliers, primes, pad, config.n_head_per_ngram)
    assert expected.max() < config.table_rows(layer_id)
    model = rows_model(multipliers, primes, pad, config.n_head_per_ngram, lut)
    hash_op, parameters = read_hash_op(model, tmp_path)
    assert hash_op.get_attributes()["blocking"] == 1
    feeds = {"input_ids": ids, "token_mask": mask}
    np.testing.assert_array_equal(ov_hash_rows(hash_op, parameters, feeds), expected)
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_blocking_rows_with_decode_history(seed, tmp_path):
    """History ids and mask of the N-1 tokens before the call: as if they began the sequence."""
    multipliers, primes, config = released_constants()
    lut = random_lut(config.compressed_vocab_size, seed)
    pad = int(lut[config.pad_id])
    before = len(multipliers) - 1
    ids, mask = random_inputs(seed=seed)
    history_ids, history_mask = random_inputs(length=before, seed=seed + 10)
    history_mask[0] = True
    history_mask[2, -1] = False  # the token just before the call masked, everything else unmasked
    full = hash_rows_v41(
        lut[np.concatenate([history_ids, ids], 1)],
        np.concatenate([history_mask, mask], 1),
        multipliers,
        primes,
        pad,
        config.n_head_per_ngram,
    )
    hash_op, parameters = read_hash_op(rows_model(multipliers, primes, pad, config.n_head_per_ngram, lut), tmp_path)
    parameters = with_history(hash_op, parameters, before)
    got = ov_hash_rows(
        hash_op,
        parameters,
        {"input_ids": ids, "token_mask": mask, "history_ids": history_ids, "history_mask": history_mask},
    )
    np.testing.assert_array_equal(got, full[:, before:])
    # an all-masked history is the same as none; one token at a time gives the same rows as all at once
    history_mask[:] = False
    got = ov_hash_rows(
        hash_op,
        parameters,
        {"input_ids": ids, "token_mask": mask, "history_ids": history_ids, "history_mask": history_mask},
    )
    alone = hash_rows_v41(lut[ids], mask, multipliers, primes, pad, config.n_head_per_ngram)
    np.testing.assert_array_equal(got, alone)
    window_ids, window_mask = np.concatenate([history_ids, ids], 1), np.concatenate([history_mask, mask], 1)
    for t in range(ids.shape[1]):
        step = ov_hash_rows(
            hash_op,
            parameters,
            {
                "input_ids": ids[:, t : t + 1],
                "token_mask": mask[:, t : t + 1],
                "history_ids": window_ids[:, t : t + before],
                "history_mask": window_mask[:, t : t + before],
            },
        )
        np.testing.assert_array_equal(step[:, 0], got[:, t])


def test_blocking_with_an_all_true_mask_is_the_demo_hash(tmp_path):
    multipliers, primes, config = released_constants()
    lut = random_lut(config.compressed_vocab_size)
    pad = int(lut[config.pad_id])
    ids, _ = random_inputs()
    mask = np.ones(ids.shape, bool)
    hash_op, parameters = read_hash_op(rows_model(multipliers, primes, pad, config.n_head_per_ngram, lut), tmp_path)
    got = ov_hash_rows(hash_op, parameters, {"input_ids": ids, "token_mask": mask})
    np.testing.assert_array_equal(got, hash_rows(ids, lut, multipliers, primes, pad, config.n_head_per_ngram))


def test_inputs_are_checked_when_the_graph_is_built(tmp_path):
    multipliers, primes, config = released_constants()
    lut = random_lut(config.compressed_vocab_size)
    hash_op, parameters = read_hash_op(rows_model(multipliers, primes, 0, config.n_head_per_ngram, lut), tmp_path)
    ids, lut, mask = (hash_op.input_value(i) for i in range(3))
    wrong = {
        "token_mask must be boolean": [ids, lut, ids],
        "compress_lut must be i64 or i32": [ids, mask, mask],
        "token_mask must be \\[": [ids, lut, ov.opset13.parameter([-1, -1, 2], ov.Type.boolean).output(0)],
        "history_ids must be": [
            ids,
            lut,
            mask,
            ov.opset13.parameter([-1, 5], ov.Type.i64).output(0),
            ov.opset13.parameter([-1, 3], ov.Type.boolean).output(0),
        ],
        "history_mask must be boolean": [
            ids,
            lut,
            mask,
            ov.opset13.parameter([-1, 3], ov.Type.i64).output(0),
            ov.opset13.parameter([-1, 3], ov.Type.i64).output(0),
        ],
        "inputs \\(blocking=1\\)": [ids, lut, mask, ov.opset13.parameter([-1, 3], ov.Type.i64).output(0)],
    }
    for message, arguments in wrong.items():
        hash_op.set_arguments(arguments)
        with pytest.raises(RuntimeError, match=message):
            hash_op.validate_and_infer_types()
    # static shapes that disagree: the mask's batch or length is not the ids'
    static_ids = ov.opset13.parameter([2, 5], ov.Type.i64).output(0)
    for shape in ([2, 6], [3, 5]):
        hash_op.set_arguments([static_ids, lut, ov.opset13.parameter(shape, ov.Type.boolean).output(0)])
        with pytest.raises(RuntimeError, match="token_mask must be"):
            hash_op.validate_and_infer_types()


def test_mismatched_shapes_are_refused_at_inference(tmp_path):
    """Dynamic shapes pass the graph checks; the plugin's shape inference refuses the call."""
    multipliers, primes, config = released_constants()
    lut = random_lut(config.compressed_vocab_size)
    hash_op, parameters = read_hash_op(rows_model(multipliers, primes, 0, config.n_head_per_ngram, lut), tmp_path)
    model = ov.Model([hash_op.output(0)], [parameters["input_ids"], parameters["token_mask"]])
    compiled = openvino_core().compile_model(model, "CPU")
    ids, mask = random_inputs()
    with pytest.raises(RuntimeError, match="token_mask must be"):
        compiled({"input_ids": ids, "token_mask": mask[:, :-1]})


def demo_rows_model(multipliers, primes, pad, n_head_per_ngram, lut) -> onnx.ModelProto:
    """The demo's one-node HashGather model (blocking=0), its function cut at the row indices."""
    function = onnx_op.hash_gather_function(len(multipliers), 18)
    del function.node[-2:]  # the table Gather and the final Reshape
    function.output[0] = "rows"
    node = helper.make_node(
        onnx_op.OP_TYPE,
        ["input_ids", "compress_lut", "table"],
        ["out"],
        domain=onnx_op.DOMAIN,
        multipliers=list(multipliers),
        primes=list(primes),
        pad_id=pad,
        n_head_per_ngram=n_head_per_ngram,
    )
    graph = helper.make_graph(
        [node],
        "hash",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["B", "T", "H"])],
        [
            onnx.numpy_helper.from_array(lut, "compress_lut"),
            onnx.numpy_helper.from_array(np.zeros((1, 1), np.float32), "table"),
        ],
    )
    return helper.make_model(
        graph,
        functions=[function],
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(onnx_op.DOMAIN, 1)],
    )


# the demo's hash: multipliers ~2^59 (negative ids' products wrap), primes just under 2^31 (rows need i64)
DEMO_CASES = {
    "huge-multipliers": ([576460752303423487, 1317624576693539401, 288230376151711745], [100003, 200003], 1),
    "int32-primes": (
        [76632096046245, 4839876093313, 35959672319349],
        [2147483249, 2147483269, 2147483353, 2147483399],
        2,
    ),
}


@pytest.mark.parametrize("name", DEMO_CASES)
def test_demo_hash_is_unchanged(name, tmp_path):
    """blocking=0: the demo's hash, with and without the id history, negative ids included."""
    multipliers, primes, heads = DEMO_CASES[name]
    lut = random_lut(99092)
    ids, _ = random_inputs()
    ids[1, ::3] = -7
    ids[2, :3] = [-1, -(2**31), -(2**20)]
    model = demo_rows_model(multipliers, primes, 5, heads, lut)
    hash_op, parameters = read_hash_op(model, tmp_path)
    assert hash_op.get_attributes()["blocking"] == 0
    expected = hash_rows(ids, lut, multipliers, primes, 5, heads)
    got = ov_hash_rows(hash_op, parameters, {"input_ids": ids})
    np.testing.assert_array_equal(got, expected)
    assert (hash_op.output(0).get_element_type() == ov.Type.i64) == (name == "int32-primes")
    before = len(multipliers) - 1
    history = ov.opset13.parameter([-1, before], ov.Type.i64, name="history_ids")
    hash_op.set_arguments([*hash_op.input_values(), history.output(0)])
    hash_op.validate_and_infer_types()
    history_ids = ids[:, :before]
    got = ov_hash_rows(
        hash_op, {**parameters, "history_ids": history}, {"input_ids": ids[:, before:], "history_ids": history_ids}
    )
    np.testing.assert_array_equal(got, expected[:, before:])


def demo_ir(tmp_path):
    """An EngramHash IR of the demo's HashGather (blocking=0), rows as the output."""
    multipliers, primes, heads = DEMO_CASES["huge-multipliers"]
    lut = random_lut(99092)
    hash_op, parameters = read_hash_op(demo_rows_model(multipliers, primes, 5, heads, lut), tmp_path)
    ids, _ = random_inputs()
    return (
        ov.Model([hash_op.output(0)], [parameters["input_ids"]]),
        ids,
        hash_rows(ids, lut, multipliers, primes, 5, heads),
    )


def test_irs_without_the_blocking_attribute_still_read(tmp_path):
    model, ids, expected = demo_ir(tmp_path)
    xml = tmp_path / "demo.xml"
    ov.save_model(model, xml, compress_to_fp16=False)
    text = xml.read_text()
    assert re.search(r'<data [^>]*blocking="0"', text)
    xml.write_text(re.sub(r' blocking="0"', "", text))
    old = openvino_core().read_model(str(xml))
    (hash_op,) = [op for op in old.get_ops() if op.get_type_name() == HASH_OP_TYPE]
    assert hash_op.get_attributes()["blocking"] == 0
    got = openvino_core().compile_model(old, "CPU")({"input_ids": ids})[0]
    np.testing.assert_array_equal(got.astype(np.int64), expected)


def test_blocking_survives_an_ir_round_trip(tmp_path):
    multipliers, primes, config = released_constants()
    lut = random_lut(config.compressed_vocab_size)
    pad = int(lut[config.pad_id])
    hash_op, parameters = read_hash_op(rows_model(multipliers, primes, pad, config.n_head_per_ngram, lut), tmp_path)
    model = ov.Model([hash_op.output(0)], [parameters["input_ids"], parameters["token_mask"]])
    ov.save_model(model, tmp_path / "v41.xml", compress_to_fp16=False)
    read = openvino_core().read_model(str(tmp_path / "v41.xml"))
    ids, mask = random_inputs()
    got = openvino_core().compile_model(read, "CPU")({"input_ids": ids, "token_mask": mask})[0]
    np.testing.assert_array_equal(
        got.astype(np.int64), hash_rows_v41(lut[ids], mask, multipliers, primes, pad, config.n_head_per_ngram)
    )


# --- the whole HashGatherFP8 op on small tables -------------------------------------------------------


def small_cases():
    tiny = V41Hashing(V41Config.from_hf(TINY))
    multipliers, _, _ = released_constants()
    four_gram_primes = [1009, 1013, 1019, 1021, 1031, 1033]  # 4-grams, 2 heads, released multipliers
    return {
        "tiny-3gram": (tiny.multipliers(3), tiny.primes(3), 2, 64, 3000),
        "released-multipliers-4gram": (multipliers, four_gram_primes, 2, 96, 99092),
    }


def fp8_tables(rows: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, (rows, width), dtype=np.uint8)
    table[(table & 0x7F) == 0x7F] -= 1  # no NaN codes
    table[0, :4] = [0x00, 0x80, 0x01, 0x7E]  # zero, -zero, the smallest subnormal, the largest value
    scales = rng.integers(120, 128, (rows, width // 32), dtype=np.uint8)
    return table, scales


@pytest.mark.parametrize("name", ["tiny-3gram", "released-multipliers-4gram"])
def test_fp8_lookup_is_exact_in_every_runtime(name, tmp_path):
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    multipliers, primes, n_heads, width, compressed = small_cases()[name]
    lut = random_lut(compressed)
    pad = int(lut[2])
    table, scales = fp8_tables(sum(primes), width)
    ids, mask = random_inputs()
    rows = hash_rows_v41(lut[ids], mask, multipliers, primes, pad, n_heads)
    block_scales = np.repeat(e8m0_values()[scales[rows]], 32, axis=-1)
    expected = (e4m3_values()[table[rows]] * block_scales).reshape(*ids.shape, -1)
    assert expected.dtype == np.float32 and expected.shape == (*ids.shape, len(primes) * width)
    assert np.isfinite(expected).all() and (expected != 0).any()

    model = fp8_model(multipliers, primes, pad, n_heads, lut, table, scales)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"input_ids": ids, "token_mask": mask}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    evaluator = ReferenceEvaluator(model, new_ops=[onnx_op_fp8.HashGatherFP8])
    np.testing.assert_array_equal(evaluator.run(None, feeds)[0], expected)
    path = tmp_path / "fp8.onnx"
    onnx.save(model, path)
    ov_model = openvino_core().read_model(str(path))
    assert [op.get_type_name() for op in ov_model.get_ops()].count(HASH_OP_TYPE) == 1
    table_gathers = [
        op
        for op in ov_model.get_ops()
        if op.get_type_name() == "Gather" and op.input_value(1).get_node().get_type_name() == HASH_OP_TYPE
    ]
    table_types = [op.input_value(0).get_element_type().get_type_name() for op in table_gathers]
    assert table_types == ["u8", "u8"]
    for config in ({"INFERENCE_PRECISION_HINT": "f32"}, {}):
        compiled = openvino_core().compile_model(ov_model, "CPU", config)
        got = compiled(feeds)[0]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
