"""Quantize an exported Engram layer with NNCF: INT8 / INT4 weights, or static INT8.

Modes:
- ``int8-weights``: ``nncf.compress_weights`` INT8 (asymmetric, per output channel) for the projection
  and, because the table feeds a standard Gather, for the table (per row: one scale per 64 values).
- ``int4-weights``: INT4 (sym or asym, ``group_size``) for the projection; the table INT8 per row, or
  INT4 with groups that fit its 64-wide rows (NNCF's default group of 128 cannot).
- ``int8``: ``nncf.quantize``: static INT8 of the projection's activations and weights, calibrated on
  the user's data; the table is kept out of it (static quantization would put one scale on the whole
  table) and then compressed per row as in ``int8-weights``. The short conv lives in the fused
  post-projection kernel and stays in float.

DeepSeek-V4.1: the FP8 table stays FP8 in its checkpoint shard (detached after NNCF, which needs it
to run the calibration); only the ``wkv`` projection is quantized. Its input is the looked-up rows,
which depend on the token ids alone, so calibration needs only text (``calibration_from_text``); the
gate's norms and dot products stay in float (``ModelType.TRANSFORMER``: NNCF's default would put
fake-quantizers on every elementwise op of the gate).

The IR records the mode and the runtime settings it was measured with (inference precision, dynamic
quantization of activations), so ``EngramRuntime`` compiles it the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nncf
import numpy as np
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

from engram_export.contract.inputs import check_inputs
from engram_export.contract.model_info import ModelInfo
from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import DEFAULT_WRITE, WriteOptions, check_output_file, load_npz
from engram_export.core.integrity import FileChecks
from engram_export.core.text import token_stream, windows
from engram_export.openvino import tables
from engram_export.openvino.compile import read_openvino, save_ir
from engram_export.openvino.precision import say_emulated

__all__ = [
    "MODES",
    "QuantizeOptions",
    "quantize",
    "quantize_model",
    "read_model",
    "read_calibration",
    "calibration_from_text",
    "compressed_constants",
]

MODES = ("int8-weights", "int4-weights", "int8")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    mode: str
    int4_symmetric: bool = True
    group_size: int = 128
    table_bits: int = 8  # int4-weights: the table in INT8 (default) or INT4
    precision: str = "f32"  # inference precision of what stays in float
    calibration: list[dict] | None = None  # int8: items of input_ids [1,T] and hidden_states [1,T,G,D]
    subset_size: int = 300  # NNCF's own default; fewer left held-out rows outside the calibrated range

    def __post_init__(self):
        if self.mode not in MODES:
            raise EngramError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.table_bits not in (4, 8):
            raise EngramError(f"table bits must be 4 or 8, got {self.table_bits}")
        if self.group_size < 1:
            raise EngramError(f"group size must be >= 1, got {self.group_size}")
        if self.mode == "int8" and not self.calibration:
            raise EngramError("mode int8 needs calibration data (--calibration)")
        if self.subset_size < 1:
            raise EngramError(f"subset size must be >= 1, got {self.subset_size}")


def read_model(path: str | Path, checks: FileChecks | None = None):
    """An exported .onnx or an f32 .xml, as an ``openvino.Model`` and its ``ModelInfo`` (files checked by
    ``checks``, those of the load it is part of, else its own)."""
    model, info = read_openvino(path, checks)
    if info.quantization or info.precision != "f32":
        raise EngramError(
            f"{path} is already {info.quantization or info.precision}; quantize the exported .onnx or an f32 .xml"
        )
    return model, info


def _table_gather_names(model) -> list[str]:
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "Gather" and op.input_value(0).get_node().get_type_name() == "Constant"
    ]


def _compress_table(nncf, model, bits: int, group_size: int):
    """The table alone, per row (INT8) or per group of a row (INT4)."""
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    ignored = nncf.IgnoredScope(names=matmuls, validate=False)
    if bits == 8:
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=group_size,
        ratio=1.0,
        all_layers=True,
        ignored_scope=ignored,
    )


def _check_v41(model_path: Path, options: QuantizeOptions) -> None:
    """DeepSeek-V4.1: quantized from its exported .onnx (where its table is read from the shard), the
    table kept as stored."""
    if model_path.suffix != ".onnx":
        raise EngramError(f"quantize the exported .onnx of a DeepSeek-V4.1 layer, not {model_path.name}")
    if options.mode == "int4-weights" and options.table_bits != 8:
        raise EngramError("a DeepSeek-V4.1 table stays FP8 as stored: drop --table-bits")


def quantize_model(model, info: ModelInfo, options: QuantizeOptions):
    """NNCF on an ``openvino.Model`` (the f32 model of one exported layer, as ``read_model`` returns it):
    the quantized ``openvino.Model``, its ``ModelInfo`` recorded in it. ``model`` is consumed. The core
    of ``quantize``, for callers that hold the model already (a DeepSeek-V4.1 table is left in the
    model: ``quantize`` detaches it afterwards)."""
    row_width, width = info.config.head_dim, info.config.engram_hidden_size
    if options.mode == "int4-weights" and width % options.group_size:
        raise EngramError(
            f"group size {options.group_size} does not divide the projection's {width} "
            f"input channels; choose a divisor of {width}"
        )
    with progress.stage(f"quantizing ({options.mode})"):
        if options.mode == "int8-weights":
            # V4.1: the projection only (its Gathers read the 256-entry FP8 decode tables, not weights)
            ignored = nncf.IgnoredScope(types=["Gather"]) if info.takes_mask else None
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)
        elif options.mode == "int4-weights":
            mode = nncf.CompressWeightsMode.INT4_SYM if options.int4_symmetric else nncf.CompressWeightsMode.INT4_ASYM
            # V4.1: its Gathers are the table's and the 256-entry FP8 decode tables'; the table stays FP8
            table = (
                nncf.IgnoredScope(types=["Gather"])
                if info.takes_mask
                else nncf.IgnoredScope(names=_table_gather_names(model), validate=False)
            )
            model = nncf.compress_weights(
                model, mode=mode, group_size=options.group_size, ratio=1.0, all_layers=True, ignored_scope=table
            )
            if not info.takes_mask:
                model = _compress_table(nncf, model, options.table_bits, min(options.group_size, row_width))
        else:
            dataset = nncf.Dataset(options.calibration)
            subset = min(options.subset_size, len(options.calibration or []))
            # 7-bit weights everywhere: CPUs without VNNI (AVX2 only) saturate the 16-bit sums of
            # u8 x s8 products, and an IR runs wherever it is copied (mean cosine 0.991 -> 0.9999)
            model = nncf.quantize(
                model,
                dataset,
                subset_size=subset,
                model_type=nncf.ModelType.TRANSFORMER if info.takes_mask else None,
                ignored_scope=nncf.IgnoredScope(types=["Gather"]),
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
            )
            if not info.takes_mask:
                model = _compress_table(nncf, model, 8, row_width)
    ModelInfo(info.config, info.layer_id, info.num_ids, options.precision, quantization=options.mode).write_openvino(
        model
    )
    return model


def quantize(
    model_path: str | Path,
    output: str | Path,
    options: QuantizeOptions,
    write: WriteOptions = DEFAULT_WRITE,
    checks: FileChecks | None = None,
) -> Path:
    """Quantize ``model_path`` (.onnx or f32 .xml) into the OpenVINO IR ``output`` (.xml): read, detach a
    DeepSeek-V4.1 table, ``quantize_model``, write. ``checks``: as ``compile_onnx``'s."""
    output = check_output_file(output, ".xml")
    say_emulated(options.precision, "CPU", f"{output.name} is written for {options.precision}")
    model, info = read_model(model_path, checks)
    if info.takes_mask:
        _check_v41(Path(model_path), options)
    model = quantize_model(model, info, options)
    links = tables.detach(model, Path(model_path).stem, output.name) if info.takes_mask else None
    return save_ir(model, output, compress_to_fp16=False, links=links, write=write)


def compressed_constants(model) -> dict[str, dict[str, int]]:
    """How each table (Gather) and projection (MatMul) stores its weights: the element type of the
    largest constant behind its weight input, through any decompression (Convert, Subtract, Multiply,
    Reshape) or FakeQuantize. E.g. ``{"table": {"u8": 1}, "projection": {"i4": 1}}``."""
    counts: dict[str, dict[str, int]] = {"table": {}, "projection": {}}
    for op in model.get_ops():
        kind = {"Gather": ("table", 0), "MatMul": ("projection", 1)}.get(op.get_type_name())
        if kind is None:
            continue
        stack, largest = [op.input_value(kind[1]).get_node()], None
        while stack:
            node = stack.pop()
            if node.get_type_name() == "Constant":
                size = np.prod(node.get_output_shape(0))
                if largest is None or size > np.prod(largest.get_output_shape(0)):
                    largest = node
            elif node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "FakeQuantize"):
                stack += [value.get_node() for value in node.input_values()]
        if largest is not None and np.prod(largest.get_output_shape(0)) >= 1024:
            dtype = largest.get_element_type().get_type_name()
            counts[kind[0]][dtype] = counts[kind[0]].get(dtype, 0) + 1
    return counts


def read_calibration(
    config,
    num_ids: int,
    npz: str | Path | None = None,
    text: str | Path | None = None,
    hidden_npy: str | Path | None = None,
) -> list[dict]:
    """Calibration items (batch 1 each) from an .npz, or from a text file and a hidden-state .npy.

    The text is tokenized with the config's tokenizer as one stream and cut into N windows of T tokens,
    N and T taken from the .npy's [N, T, G, D] shape.
    """
    info = ModelInfo(config, config.layer_ids[0], num_ids)
    if npz is not None:
        arrays = load_npz(Path(npz), ("input_ids", "hidden_states"))
        ids, hidden = arrays["input_ids"], arrays["hidden_states"]
    elif text is not None and hidden_npy is not None:
        ids, hidden = _ids_from_text(config, Path(text), Path(hidden_npy))
    else:
        raise EngramError("calibration needs an .npz, or a text file with a hidden-state .npy")
    feeds, hidden = check_inputs(info, ids, hidden)
    return [
        {**{name: value[i : i + 1] for name, value in feeds.items()}, "hidden_states": hidden[i : i + 1]}
        for i in range(len(hidden))
    ]


def calibration_from_text(
    info: ModelInfo, paths: list, tokens: int = 64, count: int = 300, seed: int = 0
) -> list[dict]:
    """Calibration items (batch 1 each) from real text: ``count`` windows of ``tokens`` ids spread over
    the files' token stream (the model's tokenizer), every token unmasked. Hidden states are seeded
    standard normal: static INT8 quantizes the projection, whose input is the looked-up rows alone; the
    hidden states reach only ops that stay in float (the demo's fused gate and conv, V4.1's gate)."""
    ids = windows(token_stream(info.config.tokenizer, paths), tokens, count)
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((*ids.shape, info.config.hc_mult, info.config.hidden_size), dtype=np.float32)
    feeds, hidden = check_inputs(info, ids, hidden)
    return [
        {**{name: value[i : i + 1] for name, value in feeds.items()}, "hidden_states": hidden[i : i + 1]}
        for i in range(len(hidden))
    ]


def _ids_from_text(config, text: Path, hidden_npy: Path):

    if config.tokenizer is None:
        raise EngramError("calibration from text needs a config with a tokenizer")
    if not hidden_npy.is_file() or not text.is_file():
        raise EngramError(f"calibration: {hidden_npy if not hidden_npy.is_file() else text} does not exist")
    try:
        hidden = np.load(hidden_npy, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise EngramError(f"calibration: {hidden_npy} is not a readable .npy ({exc})") from exc
    if hidden.ndim != 4:
        raise EngramError(f"calibration: hidden states must be [N, T, G, D], got {list(hidden.shape)}")
    count, length = hidden.shape[:2]
    stream = token_stream(config.tokenizer, [text])
    if len(stream) < count * length:
        raise EngramError(
            f"calibration: {text} gives {len(stream)} tokens, {count} x {length} needed "
            f"for the hidden states in {hidden_npy}"
        )
    return stream[: count * length].reshape(count, length), hidden
