"""ONNX -> OpenVINO IR (xml + bin) for CPU, in f32 or bf16.

The ONNX frontend converts ``engram.HashGather`` through the Engram extension into the bit-exact
``EngramHash`` op plus a standard Gather on the constant table; on an optimized graph, everything after
the projection GEMM becomes the extension's fused ``EngramGatedShortConv`` kernel. ``bf16`` stores
weights as fp16 in the .bin (OpenVINO's own weight compression: half the size, decompressed by the CPU
plugin) and records bf16 as the inference precision, which the runtime applies when it compiles.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino
from openvino import opset13 as ops

from engram_export.contract.model_info import PRECISIONS, RT_INFO_SECTION, ModelInfo, external_data_record, xml_rt_value
from engram_export.core import progress
from engram_export.core.errors import EngramError, one_line
from engram_export.core.fileio import (
    DEFAULT_WRITE,
    WriteOptions,
    check_input_file,
    check_output_file,
    staged_output,
)
from engram_export.core.integrity import FileChecks, fingerprint
from engram_export.models.deepseek_v41_config import BLOCK
from engram_export.openvino import tables
from engram_export.openvino.extension import HASH_OP_TYPE, openvino_core
from engram_export.openvino.precision import say_emulated

if TYPE_CHECKING:  # ONNX is imported where ONNX is read: reading an IR (a runtime, a shard) never loads it
    import onnx_ir as ir

__all__ = ["compile_onnx", "to_openvino", "read_onnx", "read_openvino", "save_ir"]

BIN_KEY = "engram.bin"  # "<size> <sampled sha256>" of the .bin
_PLACEHOLDER = "engram-bin-fingerprint-to-be-written"


def _read_model(path: Path, shown: Path):
    """``openvino.Core.read_model`` with the Engram extension; errors name ``shown``."""
    try:
        return openvino_core().read_model(str(path))
    except RuntimeError as exc:
        raise EngramError(f"OpenVINO cannot read {shown}: {one_line(exc)}") from exc


def _fold_fp8_projection(model) -> None:
    """DeepSeek-V4.1: the FP8 ``wkv`` dequantized here, once, into a bf16 constant [out, in]. E4M3
    values times powers of two are exact in bf16; left to the CPU plugin, folding the standard-op
    dequantization (a Gather over 157M values) took 34 s at every load of a released-size layer."""
    constants = {
        op.get_friendly_name(): op
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_friendly_name() in ("wkv", "wkv_scale")
    }
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    if len(constants) != 2 or len(matmuls) != 1:
        raise EngramError("expected the FP8 wkv, its scales and one projection MatMul in a DeepSeek-V4.1 model")
    # PyTorch's FP8 types decode wkv: imported here, so that reading an IR (a runtime) never loads PyTorch
    import torch

    from engram_export.models.deepseek_v41 import dequantize_blocks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only arrays of the mapped shard: never written
        wkv = torch.from_numpy(constants["wkv"].data).view(torch.float8_e4m3fn)
        scale = torch.from_numpy(constants["wkv_scale"].data).view(torch.float8_e8m0fnu)
    weight = openvino.Tensor(openvino.Type.bf16, openvino.Shape(list(wkv.shape)))
    bits, rows = weight.data.view(np.uint16), 32 * BLOCK
    for start in range(0, wkv.shape[0], rows):  # in row blocks: no f32 copy of the whole matrix
        block = dequantize_blocks(wkv[start : start + rows], scale[start // BLOCK : (start + rows) // BLOCK])
        bits[start : start + len(block)] = block.bfloat16().view(torch.int16).numpy().view(np.uint16)
    matmul = matmuls[0]
    folded = ops.matmul(
        matmul.input_value(0), ops.convert(openvino.op.Constant(weight), openvino.Type.f32), False, True
    )
    matmul.output(0).replace(folded.output(0))


# The element types of the tensors an exported file keeps in external data: whole bytes each, so a
# tensor's mapping is its element count times the size of the OpenVINO type its input gets
_MAPPED_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "UINT8", "INT8", "INT32", "INT64", "BOOL"})  # ir.DataType


def _external_as_inputs(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    """Make each initializer of ``model`` held in external data a graph input of its type and shape
    (OpenVINO reads the external data of an in-memory graph only from below the working directory);
    returns those tensors by name."""
    import onnx_ir as ir

    moved = {}
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if tensor.dtype.name not in _MAPPED_TYPES:
            raise EngramError(f"initializer {name} is stored as {tensor.dtype.name}, which engram-export does not map")
        model.graph.initializers.pop(name)
        value.const_value = None
        value.type, value.shape = ir.TensorType(tensor.dtype), tensor.shape
        model.graph.inputs.append(value)
        moved[name] = tensor
    return moved


def _mapped_back(converted, moved: dict[str, ir.ExternalTensor], recorded: dict) -> None:
    """Replace the inputs ``_external_as_inputs`` made by constants over read-only mappings of their
    files (``tables.mapped_in_place_of``, as tables are at load); each records its file and offset."""
    parameters = {p.get_friendly_name(): p for p in converted.get_parameters()}
    for name, tensor in moved.items():
        path, offset = tensor.path, tensor.offset or 0
        constant = tables.mapped_in_place_of(converted, parameters[name], Path(path), offset, list(tensor.shape))
        source = {"path": path, "offset": offset}
        if "sha256" in recorded.get(Path(path).name, {}):  # a checkpoint shard's SHA-256, known at export
            source["sha256"] = recorded[Path(path).name]["sha256"]
        constant.get_rt_info()[tables.SOURCE_KEY] = json.dumps(source)


def to_openvino(model: ir.Model):
    """An exported Engram graph (``onnx_ir.Model``, as ``read_onnx_file`` or ``trace`` and
    ``optimize_graph`` give it) as an ``openvino.Model``: the hash as ``EngramHash``, the post-projection
    block as ``EngramGatedShortConv`` when the graph was optimized (``passes.lower_for_openvino``, on a
    copy: ``model`` is left as it was), a DeepSeek-V4.1 FP8 projection folded into bf16. The graph goes
    to OpenVINO in memory; tensors in external data are mapped from their files, not read or copied."""
    import onnx_ir as ir

    from engram_export.onnx.files import EXTERNAL_DATA_THRESHOLD, with_absolute_data_paths

    # the passes know the custom ops' PyTorch side: imported here, so that reading an IR never loads PyTorch
    from engram_export.passes import lower_for_openvino

    fp8_projection = "wkv_scale" in model.graph.initializers  # DeepSeek-V4.1
    try:
        lowered = model.clone()  # shares the tensors
        with_absolute_data_paths(lowered)
        lower_for_openvino(lowered)
    except Exception as exc:  # onnx-ir's errors on a graph it cannot walk (RuntimeError, ValueError, PassError)
        raise EngramError(f"the graph is broken ({type(exc).__name__}: {one_line(exc)})") from exc
    moved = _external_as_inputs(lowered)
    inline = sum(v.const_value.nbytes for v in lowered.graph.initializers.values() if v.const_value is not None)
    if inline > EXTERNAL_DATA_THRESHOLD:
        raise EngramError(
            f"the model holds {inline / 2**30:.1f} GiB of tensors in memory, more than one ONNX protobuf "
            f"can carry to OpenVINO: write it with save_onnx and read it back (its tables then stay in the file)"
        )
    try:
        converted = openvino_core().read_model(io.BytesIO(ir.to_proto(lowered).SerializeToString()))
    except RuntimeError as exc:
        raise EngramError(f"OpenVINO cannot read the model: {one_line(exc)}") from exc
    _mapped_back(converted, moved, external_data_record(model))
    if fp8_projection:
        _fold_fp8_projection(converted)
    if not any(op.get_type_name() == HASH_OP_TYPE for op in converted.get_ops()):
        raise EngramError(f"the hash-gather node was not converted to {HASH_OP_TYPE}")
    return converted


def read_onnx(onnx_path: str | Path, checks: FileChecks | None = None):
    """The exported .onnx file as an ``openvino.Model`` (``to_openvino``) and its ``ModelInfo``; the
    file is read once, its external data mapped."""
    from engram_export.onnx.files import read_onnx_file

    model, info = read_onnx_file(onnx_path, checks)
    try:
        return to_openvino(model), info
    except EngramError as exc:
        raise EngramError(f"{onnx_path}: {exc}") from exc


def _recorded_fingerprint(path: Path) -> dict:
    """The .bin fingerprint that ``save_ir`` wrote into the .xml's rt_info, read before OpenVINO
    touches the .bin."""
    found = re.fullmatch(r"(\d+) ([0-9a-f]{64})(?: ([0-9a-f]{64}))?", xml_rt_value(path, BIN_KEY) or "")
    if not found:
        raise EngramError(
            f"{path} records no fingerprint of its .bin (not written by this engram-export: compile it again)"
        )
    return {"size": int(found[1]), "sampled_sha256": found[2], **({"sha256": found[3]} if found[3] else {})}


def read_openvino(path: str | Path, checks: FileChecks | None = None):
    """An exported .onnx or a compiled .xml as an ``openvino.Model`` and its ``ModelInfo``; the files
    it reads (an .xml's .bin and tables) must match the fingerprints recorded when they were written,
    to the depth of ``checks`` (default: every byte of files up to 1 GiB)."""
    path = check_input_file(path, (".onnx", ".xml"), "model")
    checks = checks or FileChecks()
    if path.suffix == ".onnx":
        return read_onnx(path, checks)
    checks.check(path.with_suffix(".bin"), _recorded_fingerprint(path), str(path))
    model = _read_model(path, path)
    info = ModelInfo.from_openvino(model, path)
    tables.attach(model, path, checks)
    return model, info


def save_ir(
    model,
    output: Path,
    compress_to_fp16: bool,
    links: dict[str, Path] | None = None,
    write: WriteOptions = DEFAULT_WRITE,
) -> Path:
    """Write ``model`` to ``output`` (.xml, its .bin beside), whole or not at all, the .xml recording
    the .bin's size, sampled and full SHA-256 (``integrity.py``) for every later reader to check.

    ``links``: files to put beside it (name -> source), the checkpoint shards of tables that stay out
    of the IR (``tables.detach``), placed by ``write`` (hard-linked, or copied where no link can be)."""
    model.set_rt_info(_PLACEHOLDER, [RT_INFO_SECTION, BIN_KEY])
    with progress.stage(f"writing {output.name}"), staged_output(output) as staged:
        for name, source in (links or {}).items():
            write.place_table(source, staged.parent / name)
        openvino.save_model(model, staged, compress_to_fp16=compress_to_fp16)
        weights = fingerprint(staged.with_suffix(".bin"))
        xml = staged.read_text()
        if xml.count(_PLACEHOLDER) != 1:
            raise EngramError(f"writing {output}: the weights fingerprint has no unique place in the IR")
        recorded = " ".join(str(weights[k]) for k in ("size", "sampled_sha256", "sha256") if k in weights)
        staged.write_text(xml.replace(_PLACEHOLDER, recorded))
    return output


def compile_onnx(
    onnx_path: str | Path,
    output: str | Path,
    precision: str = "f32",
    write: WriteOptions = DEFAULT_WRITE,
    checks: FileChecks | None = None,
) -> Path:
    """Write the OpenVINO IR of ``onnx_path`` to ``output`` (.xml, with its .bin beside; a DeepSeek-V4.1
    table stays in its checkpoint shard, linked beside). ``checks``: the checks of the load it is part
    of (a folder's, whose manifest hashed the files already), else its own."""
    if precision not in PRECISIONS:
        raise EngramError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    output = check_output_file(output, ".xml")
    say_emulated(precision, "CPU", f"{output.name} is written for {precision}")
    with progress.stage(f"converting {Path(onnx_path).name} to OpenVINO"):
        model, info = read_onnx(onnx_path, checks)
    ModelInfo(info.config, info.layer_id, info.num_ids, precision).write_openvino(model)
    links = tables.detach(model, Path(onnx_path).stem, output.name) if info.takes_mask else None
    return save_ir(model, output, compress_to_fp16=precision == "bf16", links=links, write=write)
