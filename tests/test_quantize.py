"""NNCF quantization: which constants are compressed to which type per mode, accuracy floors on a
small config, and the command line end to end.

Accuracy is measured against the PyTorch layer on held-out inputs (seeds not used for calibration),
with the floors ``engram-export verify`` applies: int8-weights mean row cosine >= 0.9999, int8 >= 0.999,
int4-weights >= 0.99.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.measure.verify import QUANTIZED_MIN_MEAN_COSINE, compare, random_inputs
from engram_export.openvino.extension import openvino_core
from engram_export.openvino.quantize import QuantizeOptions, compressed_constants, quantize, read_calibration
from engram_export.runtime import EngramRuntime
from tests.helpers import cli, refused

MODES = {
    "int8-weights": ({}, {"table": {"u8": 1}, "projection": {"u8": 1}}),
    "int4-weights": ({"group_size": 32}, {"table": {"u8": 1}, "projection": {"i4": 1}}),
    "int4-weights-asym-table4": (
        {"group_size": 16, "int4_symmetric": False, "table_bits": 4},
        {"table": {"u4": 1}, "projection": {"u4": 1}},
    ),
    "int8": ({"calibration": "calibration"}, {"table": {"u8": 1}, "projection": {"i8": 1}}),
}


@pytest.fixture(scope="module")
def calibration(tiny_config):
    return [
        dict(zip(("input_ids", "hidden_states"), random_inputs(tiny_config, 5000, 1, 14, 100 + i), strict=True))
        for i in range(16)
    ]


@pytest.fixture(scope="module")
def quantized(tiny_files, calibration, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    models = {}
    for name, (options, _) in MODES.items():
        options = {k: (calibration if v == "calibration" else v) for k, v in options.items()}
        mode = name if name in ("int8-weights", "int4-weights", "int8") else "int4-weights"
        models[name] = quantize(tiny_files["onnx"], folder / f"{name}.xml", QuantizeOptions(mode, **options))
    return models


@pytest.mark.parametrize("name", MODES)
def test_constants_are_compressed_to_the_mode_types(quantized, name):
    assert compressed_constants(openvino_core().read_model(str(quantized[name]))) == MODES[name][1]


def table_bytes(xml) -> int:
    """Bytes of every constant behind the table Gather's data input (weights, scales, zero points)."""
    model = openvino_core().read_model(str(xml))
    (gather,) = [
        op
        for op in model.get_ops()
        if op.get_type_name() == "Gather" and op.input_value(1).get_node().get_type_name() == "EngramHash"
    ]
    stack, seen, total = [gather.input_value(0).get_node()], set(), 0
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "Constant":
            total += int(np.prod(node.get_output_shape(0))) * node.get_element_type().bitwidth // 8
        stack += [value.get_node() for value in node.input_values()]
    return total


@pytest.mark.parametrize(
    "name,fraction", [("int8-weights", 1 / 4), ("int8", 1 / 4), ("int4-weights-asym-table4", 1 / 8)]
)
def test_table_size_on_disk(quantized, tiny_layer, name, fraction):
    """INT8 a quarter of f32, INT4 an eighth, plus an f16 scale and a zero point per row (the INT4
    table's groups are min(group size, row width) = one row here)."""
    rows, width = tiny_layer.multi_head_embedding.embedding.weight.shape
    assert table_bytes(quantized[name]) <= rows * width * 4 * fraction + rows * 3


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("batch,tokens", [(50, 14), (1, 1), (3, 17)])
def test_accuracy_floors_on_held_out_inputs(quantized, tiny_layer, name, batch, tokens):
    runtime = EngramRuntime(quantized[name])
    mode = runtime.quantization
    assert mode == (name if name in QUANTIZED_MIN_MEAN_COSINE else "int4-weights")
    ids, hidden = random_inputs(tiny_layer.config, 5000, batch, tokens, seed=999)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    result = compare(name, reference, runtime(ids, hidden), runtime.precision, mode)
    assert result.passed, result


@pytest.mark.parametrize("kernel", [True, False])
def test_int8_keeps_the_table_compressed_in_memory(quantized, kernel):
    """Compiled as two stages, the lookup keeps its u8 table, whether the row kernel reads it or
    OpenVINO's Gather: no f32 copy of the table in the runtime graph."""
    runtime = EngramRuntime(quantized["int8"], lookup_kernel=kernel)
    lookup_ops = runtime[runtime.layer_id]._backend.lookups.compiled.get_runtime_model().get_ops()
    names = {op.get_friendly_name() if kernel else op.get_rt_info()["layerType"].astype(str) for op in lookup_ops}
    assert ("EngramGatherRows" if kernel else "Gather") in names
    constants = [op for op in lookup_ops if op.get_rt_info()["layerType"].astype(str) == "Const"]
    table_types = {
        op.get_rt_info()["outputPrecisions"].astype(str)
        for op in constants
        if np.prod(op.get_output_partial_shape(0).to_shape()) >= 10328 * 8
    }
    assert table_types == {"u8"}, table_types


def test_bad_options(tiny_files, tmp_path, tiny_config):
    with pytest.raises(EngramError, match="needs calibration"):
        QuantizeOptions("int8")
    with pytest.raises(EngramError, match="mode must be one of"):
        QuantizeOptions("int3")
    with pytest.raises(EngramError, match="does not divide the projection's 64 input channels"):
        quantize(tiny_files["onnx"], tmp_path / "q.xml", QuantizeOptions("int4-weights", group_size=128))
    with pytest.raises(EngramError, match="already int8-weights"):
        q = quantize(tiny_files["onnx"], tmp_path / "q.xml", QuantizeOptions("int8-weights"))
        quantize(q, tmp_path / "q2.xml", QuantizeOptions("int8-weights"))
    with pytest.raises(EngramError, match="output folder"):
        quantize(tiny_files["onnx"], tmp_path / "no" / "q.xml", QuantizeOptions("int8-weights"))
    np.savez(
        tmp_path / "bad.npz", input_ids=np.zeros((2, 3), np.int64), hidden_states=np.zeros((2, 3, 4, 47), np.float32)
    )
    with pytest.raises(EngramError, match=r"got \[2, 3, 4, 47\]"):
        read_calibration(tiny_config, 5000, npz=tmp_path / "bad.npz")


def test_calibration_from_text_and_hidden_states(tiny_config, tokenizer_json, tmp_path):
    config = tiny_config.replace(tokenizer=str(tokenizer_json), pad_id=0, vocab_size=30522)
    (tmp_path / "corpus.txt").write_text("Only Alexander the Great could tame the horse Bucephalus. " * 20)
    np.save(tmp_path / "hidden.npy", np.zeros((4, 10, 4, 48), np.float32))
    items = read_calibration(config, 30522, text=tmp_path / "corpus.txt", hidden_npy=tmp_path / "hidden.npy")
    assert len(items) == 4 and items[0]["input_ids"].shape == (1, 10)
    assert items[0]["input_ids"][0, 0] == 2069  # "only"
    np.save(tmp_path / "hidden.npy", np.zeros((400, 10, 4, 48), np.float32))
    # every token counts: 20 x 13 (the tokenizer.json's own truncation at 128 tokens is turned off)
    with pytest.raises(EngramError, match="gives 260 tokens, 400 x 10 needed"):
        read_calibration(config, 30522, text=tmp_path / "corpus.txt", hidden_npy=tmp_path / "hidden.npy")


def test_quantize_command_end_to_end(tiny_files, calibration, tmp_path):
    np.savez(
        tmp_path / "calib.npz",
        input_ids=np.concatenate([c["input_ids"] for c in calibration]),
        hidden_states=np.concatenate([c["hidden_states"] for c in calibration]),
    )
    done = cli(
        "quantize",
        tiny_files["onnx"],
        "-o",
        tmp_path / "int8.xml",
        "--mode",
        "int8",
        "--calibration",
        tmp_path / "calib.npz",
        "--subset-size",
        "8",
    )
    assert "table stored as u8, projection as i8" in done.stdout
    ids, hidden = random_inputs(EngramRuntime(tmp_path / "int8.xml").config, 5000, 2, 5)
    np.savez(tmp_path / "in.npz", input_ids=ids, hidden_states=hidden)
    cli("run", tmp_path / "int8.xml", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert np.load(tmp_path / "out.npz")["output"].shape == (2, 5, 4, 48)
    refused(
        cli("quantize", tiny_files["onnx"], "-o", tmp_path / "x.xml", "--mode", "int8", check=False),
        "mode int8 needs calibration data",
    )
    assert not (tmp_path / "x.xml").exists()


@pytest.mark.parametrize("name", ["int8-weights", "int4-weights", "int8"])
def test_quantized_projection_stays_quantized_under_bf16(quantized, tiny_layer, name):
    """Loaded with precision bf16, a quantized projection is left as NNCF made it (the bf16 fuse stage
    retypes only float projections): the GEMM keeps integer weights, and the numbers hold."""
    runtime = EngramRuntime(quantized[name], precision="bf16")
    fuse = runtime[runtime.layer_id]._backend.fuses.compiled.get_runtime_model().get_ordered_ops()
    gemm = [op for op in fuse if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    assert len(gemm) == 1 and gemm[0].get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8", "u4", "i4")
    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), 3, 17, seed=6)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    assert compare(name, reference, runtime(ids, hidden), "bf16", name).passed


def test_quantize_model_works_on_a_model_in_memory(tiny_files, quantized):
    """The core step takes and returns an ``openvino.Model`` (``quantize`` reads, calls it, writes):
    the same compression as the file path, and the mode recorded in the model."""
    from engram_export.openvino.quantize import quantize_model, read_model

    model, info = read_model(tiny_files["onnx"])
    model = quantize_model(model, info, QuantizeOptions("int8-weights"))
    assert compressed_constants(model) == compressed_constants(
        openvino_core().read_model(str(quantized["int8-weights"]))
    )
    from engram_export.contract.model_info import QUANTIZATION_KEY, RT_INFO_SECTION

    assert model.get_rt_info([RT_INFO_SECTION, QUANTIZATION_KEY]).astype(str) == "int8-weights"
