"""Tables that stay in the checkpoint's own bytes: detached from the IR at compile, mapped at load.

An OpenVINO IR keeps every constant in its ``.bin``, so a DeepSeek-V4.1 table (94 GiB of FP8) there
would be a copy. ``compile`` instead turns the table (and scale) constants into parameters, records in
the IR where their bytes are (a hard link of the checkpoint shard beside the IR, byte offset, shape,
and the file's size and sampled SHA-256), and links the shard beside the IR. At load, ``attach``
maps each file read-only with random-access advice and puts back a constant that *shares* the mapping:
nothing is read until a lookup touches its rows (compile and load cost the same whatever the table size, with no
growth of resident memory). A parameter would not do: the CPU plugin allocates its own buffer for
every input. The constant keeps the stored type (u8 FP8 codes, bf16 or f32), the parameter's: it is
made from an ``openvino.Tensor`` of that type over the mapped bytes (bf16 has no numpy type, so
``ops.constant(array)`` cannot make it). Such a tensor does not own its memory: the constant holds the
mapping in its rt_info instead (OpenVINO keeps a Python object there, released under the GIL with the
last copy of the node, compiled models included). The CPU plugin scans every f32 constant for
subnormals when it compiles (reading a whole f32 table, and copying it if it finds any): the runtime
compiles a lookup over an f32 table with ``CPU_DENORMALS_OPTIMIZATION``, which skips the scan.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
from pathlib import Path

import numpy as np
import openvino
from openvino import opset13 as ops

from engram_export.contract.model_info import RT_INFO_SECTION, xml_rt_value
from engram_export.core.errors import EngramError
from engram_export.core.integrity import fingerprint

__all__ = ["detach", "attach", "table_files", "shared_constant", "owned_bytes", "TABLES_KEY", "TABLE_CONSTANTS"]

TABLES_KEY = "engram.tables"  # rt_info: JSON, parameter name -> {file, offset, shape, size, sampled_sha256}
TABLE_CONSTANTS = ("table", "table_scale")  # the ONNX initializers of the table and (FP8 only) its scales
SOURCE_KEY = "engram_source"  # rt_info of a constant mapped from external data: JSON {path, offset}


def detach(model, onnx_stem: str, xml_name: str) -> dict[str, Path]:
    """Replace the table constants of ``model`` (``compile.to_openvino``'s, which records the file each
    one was read from, ``<onnx stem>.<shard>``) by parameters and record them in its rt_info as files
    ``<xml stem>.<shard>``; returns those names -> the files to link."""
    constants = {
        op.get_friendly_name(): op
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_friendly_name() in TABLE_CONSTANTS
    }
    if "table" not in constants or not all(SOURCE_KEY in op.get_rt_info() for op in constants.values()):
        raise EngramError(
            f"expected the table constants (table, and table_scale if FP8) read from external data, "
            f"found {sorted(constants)}"
        )
    stem, records, links = xml_name[: -len(".xml")], {}, {}
    for name, constant in constants.items():
        source = json.loads(constant.get_rt_info()[SOURCE_KEY].astype(str))
        path = Path(source["path"])
        target = f"{stem}.{path.name.removeprefix(onnx_stem + '.')}"
        links[target] = path
        parameter = ops.parameter(constant.get_output_partial_shape(0), constant.get_element_type())
        parameter.set_friendly_name(f"engram_{name}")
        parameter.output(0).set_names({f"engram_{name}"})
        constant.output(0).replace(parameter.output(0))
        model.add_parameters([parameter])
        records[f"engram_{name}"] = {
            "file": target,
            "offset": source["offset"],
            "shape": list(parameter.get_output_partial_shape(0).to_shape()),
            **fingerprint(path, full=False, known_sha256=source.get("sha256")),
        }
    model.set_rt_info(json.dumps(records), [RT_INFO_SECTION, TABLES_KEY])
    return links


def _records(model) -> dict:

    if not model.has_rt_info([RT_INFO_SECTION, TABLES_KEY]):
        return {}
    return json.loads(model.get_rt_info([RT_INFO_SECTION, TABLES_KEY]).astype(str))


def table_files(xml: Path) -> dict[str, dict]:
    """The table files an .xml reads (name -> record), from its text, without reading the model."""
    value = xml_rt_value(xml, TABLES_KEY)
    if value is None:
        return {}
    try:
        return {record["file"]: record for record in json.loads(value).values()}
    except (ValueError, KeyError, TypeError) as exc:
        raise EngramError(f"{xml}: malformed table record") from exc


class _Owned(np.ndarray):
    """A uint8 array flagged writeable over memory someone else owns (OpenVINO shares only such arrays,
    and never writes a constant); ``owner`` keeps that memory alive."""

    owner: object


def owned_bytes(address: int, nbytes: int, owner) -> np.ndarray:
    """A flat uint8 array over ``nbytes`` at ``address``, which keeps ``owner`` (what owns that memory) alive."""
    alias = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address)).view(_Owned)
    alias.owner = owner
    return alias


def shared_constant(data: np.ndarray, owner, kind: str = "u8", shape=None):
    """A constant over ``data``'s bytes (no copy), of element type ``kind`` (an ``openvino.Type`` name)
    and ``shape`` (default ``data``'s). The tensor is only a view: the constant keeps ``owner`` alive in
    its rt_info (OpenVINO releases it with the last copy of the node, compiled models included)."""
    alias = owned_bytes(data.ctypes.data, data.nbytes, owner)
    tensor = openvino.Tensor(
        alias, openvino.Shape(list(data.shape if shape is None else shape)), getattr(openvino.Type, kind)
    )
    constant = openvino.op.Constant(tensor, shared_memory=True)
    constant.set_rt_info(alias, "engram_mapping")
    return constant


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def map_bytes(path: Path, offset: int, nbytes: int, what: str) -> np.memmap:
    """A read-only mapping of ``nbytes`` bytes of ``path`` at ``offset`` with random-access advice."""
    try:
        mapped = np.memmap(path, np.uint8, "r", offset, (nbytes,))
    except (OSError, ValueError) as exc:
        raise EngramError(f"cannot map {what}: {nbytes} bytes at offset {offset} of {path} ({exc})") from exc
    mapping = getattr(mapped, "_mmap", None)  # numpy keeps the mmap object of a memmap there
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)  # a cold row reads its page, not megabytes ahead
    return mapped


def attach(model, xml: Path, checks) -> None:
    """Put the recorded tables back into ``model`` as constants of the parameters' types that share
    read-only mappings of their files (the constants keep the mappings alive), each file checked first
    (``checks``, an ``integrity.FileChecks``)."""
    parameters = {p.get_friendly_name(): p for p in model.get_parameters()}
    for name, record in _records(model).items():
        path = xml.parent / record["file"]
        if name not in parameters:
            raise EngramError(f"{xml} records table {name}, which is not an input of the model")
        if checks.table_elsewhere(path):  # served by shards: never read here
            kind = parameters[name].get_element_type()
            _constant_in_place_of(
                model, parameters[name], _unbacked(math.prod(record["shape"]) * kind.size), record["shape"]
            )
            continue
        checks.check(path, record, str(xml))
        mapped_in_place_of(model, parameters[name], path, record["offset"], record["shape"])


def _unbacked(nbytes: int) -> np.ndarray:
    """``nbytes`` of address space that no memory backs and nothing may read (a table served by shards:
    its constant gives the lookup its shape and type, never its bytes; a read would fault)."""
    space = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE, prot=0)  # PROT_NONE
    return np.frombuffer(space, np.uint8, nbytes)


def mapped_in_place_of(model, parameter, path: Path, offset: int, shape):
    """Replace the input ``parameter`` of ``model`` by a constant of its type and name and of ``shape``
    over a read-only mapping of ``path`` at ``offset`` (nothing is read until used; the constant keeps
    the mapping alive); returns the constant."""
    kind, name = parameter.get_element_type(), parameter.get_friendly_name()
    return _constant_in_place_of(model, parameter, map_bytes(path, offset, math.prod(shape) * kind.size, name), shape)


def _constant_in_place_of(model, parameter, data: np.ndarray, shape):
    """Replace the input ``parameter`` of ``model`` by a constant of its type and name and of ``shape``
    over ``data`` (shared, which the constant keeps alive); returns the constant."""
    constant = shared_constant(data, data, parameter.get_element_type().get_type_name(), shape)
    constant.set_friendly_name(parameter.get_friendly_name())
    constant.output(0).set_names(parameter.output(0).get_names())
    parameter.output(0).replace(constant.output(0))
    model.remove_parameter(parameter)
    return constant
