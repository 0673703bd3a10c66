"""Exported .onnx files: read once, written whole or not at all.

An exported file carries its ``ModelInfo`` and, when its tensors live in a ``<name>.data`` file beside
it, that file's size and sampled SHA-256 (``core/integrity.py``), which every reader checks before use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx_ir as ir

from engram_export.contract.model_info import EXTERNAL_DATA_KEY, ModelInfo, external_locations
from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_input_file, check_output_file, staged_output
from engram_export.core.integrity import fingerprint

__all__ = ["load_onnx", "read_onnx_file", "save_onnx", "with_absolute_data_paths", "EXTERNAL_DATA_THRESHOLD"]

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GiB limit, with room for the graph itself
_INLINE_BELOW = 1024  # with external data, smaller tensors stay in the .onnx


def read_onnx_file(path: str | Path, checks=None) -> tuple[ir.Model, ModelInfo]:
    """An exported .onnx, read once: its graph as an onnx_ir model (external data mapped, read only
    where used) and its ``ModelInfo``, checked against the graph and the external data files (to the
    depth of ``checks``, an ``integrity.FileChecks``; default: every byte of files up to 1 GiB)."""
    path = check_input_file(path, (".onnx",), "model")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf and file errors
        raise EngramError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from exc
    return model, ModelInfo.from_onnx(model, path, checks)  # refuses files that engram-export did not write


def with_absolute_data_paths(model: ir.Model) -> None:
    """Point each external initializer of ``model`` (a copy: ONNX Runtime takes only relative locations)
    at its file by absolute path, with no base folder. onnx-ir then reads it without its own checks
    against links, which refuse a data file with a second hard link (a DeepSeek-V4.1 shard always has
    one; so does a copy made with ``cp -al``); ``read_onnx_file`` has checked these files: plain names
    beside the .onnx, with the fingerprints it recorded."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.ExternalTensor(
                os.path.abspath(tensor.path),
                tensor.offset,
                tensor.length,
                tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
            )


def load_onnx(path: str | Path) -> ir.Model:
    """An exported .onnx as an onnx_ir model, for the passes (``read_onnx_file`` with its info)."""
    return read_onnx_file(path)[0]


def save_onnx(model: ir.Model, output: str | Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``model`` whole or not at all; initializers go to ``<name>.data`` if the file would be
    larger than ``external_data_threshold`` bytes, and the .onnx then records that file's size and
    sampled SHA-256. ``model`` itself is left as it was."""
    output = check_output_file(output, ".onnx")
    sizes = [v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value]
    size = sum(sizes)
    external = size > external_data_threshold
    with (
        progress.stage(f"writing {output.name} ({size / 2**20:.0f} MiB{', external data' if external else ''})"),
        staged_output(output) as staged,
    ):
        written = model.clone()  # shares the tensors; its initializers and metadata change below
        with_absolute_data_paths(written)
        written.metadata_props.pop(EXTERNAL_DATA_KEY, None)  # a loaded model's record of its old data file
        if not external:
            ir.save(ir.external_data.load_to_model(written), staged)  # every tensor inside the file
            return output
        data = staged.with_name(f"{output.name}.data")
        data_bytes = sum(nbytes for nbytes in sizes if nbytes >= _INLINE_BELOW)
        with progress.bytes_written(staged.parent, data_bytes, data.name):
            ir.external_data.unload_from_model(written, staged.parent, data.name, size_threshold_bytes=_INLINE_BELOW)
        files = {name: fingerprint(staged.parent / name) for name in sorted(external_locations(written))}
        written.metadata_props[EXTERNAL_DATA_KEY] = json.dumps(files)
        ir.save(written, staged)
    return output
