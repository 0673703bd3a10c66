"""ONNX -> OpenVINO IR (xml + bin) for CPU, in f32 or bf16.

The ONNX frontend converts ``engram.HashGather`` through the Engram extension into the bit-exact
``EngramHash`` op plus a standard Gather on the constant table; on an optimized graph, everything after
the projection GEMM becomes the extension's fused ``EngramGatedShortConv`` kernel. ``bf16`` stores
weights as fp16 in the .bin (OpenVINO's own weight compression: half the size, decompressed by the CPU
plugin) and records bf16 as the inference precision, which the runtime applies when it compiles.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from engram_export import progress
from engram_export.errors import EngramError
from engram_export.fileio import check_input_file, check_output_file, staged_output
from engram_export.model_info import PRECISIONS, ModelInfo
from engram_export.ov_extension import HASH_OP_TYPE, openvino_core

__all__ = ["compile_onnx", "read_onnx", "read_openvino"]


def _lowered_copy(onnx_path: Path) -> Path | None:
    """A hidden copy of the graph beside ``onnx_path`` with ``passes.lower_for_openvino`` applied,
    or None if nothing was lowered. Large tensors stay in the original external-data file."""
    from engram_export.passes import lower_for_openvino

    model = ir.load(onnx_path)  # read_onnx has checked the file already
    if not lower_for_openvino(model).modified:
        return None
    lowered = onnx_path.parent / f".{onnx_path.stem}.openvino-{os.getpid()}.onnx"
    try:
        ir.save(model, lowered)  # external tensors keep pointing at the original data file
    except OSError as exc:
        raise EngramError(f"cannot write beside {onnx_path} ({exc.strerror})") from None
    return lowered


def _read_model(path: Path, shown: Path):
    """``openvino.Core.read_model`` with the Engram extension; errors name ``shown``."""
    try:
        return openvino_core().read_model(str(path))
    except RuntimeError as exc:
        raise EngramError(f"OpenVINO cannot read {shown}: {str(exc).splitlines()[0]}") from None


def read_onnx(onnx_path: str | Path):
    """The ONNX file as an ``openvino.Model`` (hash as ``EngramHash``, the post-projection block as
    ``EngramGatedShortConv`` when the graph was optimized) and its ``ModelInfo``."""
    onnx_path = check_input_file(onnx_path, (".onnx",), "model")
    info = ModelInfo.from_onnx(onnx_path)
    lowered = _lowered_copy(onnx_path)
    try:
        model = _read_model(lowered or onnx_path, onnx_path)
    finally:
        if lowered is not None:
            lowered.unlink(missing_ok=True)
    if not any(op.get_type_name() == HASH_OP_TYPE for op in model.get_ops()):
        raise EngramError(f"{onnx_path}: the hash-gather node was not converted to {HASH_OP_TYPE}")
    return model, info


def read_openvino(path: str | Path):
    """An exported .onnx or a compiled .xml as an ``openvino.Model`` and its ``ModelInfo``."""
    path = check_input_file(path, (".onnx", ".xml"), "model")
    if path.suffix == ".onnx":
        return read_onnx(path)
    model = _read_model(path, path)
    return model, ModelInfo.from_openvino(model, path)


def compile_onnx(onnx_path: str | Path, output: str | Path, precision: str = "f32") -> Path:
    """Write the OpenVINO IR of ``onnx_path`` to ``output`` (.xml, with its .bin beside)."""
    import openvino

    if precision not in PRECISIONS:
        raise EngramError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    output = check_output_file(output, ".xml")
    with progress.stage(f"converting {Path(onnx_path).name} to OpenVINO"):
        model, info = read_onnx(onnx_path)
    ModelInfo(info.config, info.layer_id, info.num_ids, precision).write_openvino(model)
    with progress.stage(f"writing {output.name} ({precision})"), staged_output(output) as staged:
        openvino.save_model(model, staged, compress_to_fp16=precision == "bf16")
    return output
