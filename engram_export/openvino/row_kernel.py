"""The lookup stage on the extension's row-gather kernel, with the table in the memory the user picks.

An IR keeps the table lookup standard (``Gather`` on the table, with NNCF's decompression nodes or the
FP8 decode ops in front), so any OpenVINO tool can read it. At load, ``install`` puts the extension's
``EngramGatherRows`` in place of that Gather and everything that decodes the table: it reads the stored
bytes of each looked-up row once (u8 or u4 codes with their scale and zero point, FP8 codes with their
E8M0 block scales, f16, bf16 or f32) and writes f32 or bf16, the precision the fuse stage reads. OpenVINO's
own path for a compressed table is a reference kernel (u8, u4, f16) or a chain of ops over [B,T,C,d]
(FP8); see ``engram-export bench`` for both side by side. A graph that is not one of these forms is
left as it is.

Where the table's bytes live while it is served (``table_memory``) is a ``table_store.TableStore``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from openvino import opset13 as ops

from engram_export.models.deepseek_v41_config import e4m3_values, e8m0_values
from engram_export.openvino.extension import make_node
from engram_export.openvino.table_store import TableStore, table_store
from engram_export.openvino.tables import owned_bytes, shared_constant
from engram_export.openvino.tiered import RowLayout

__all__ = ["install", "stored_table", "StoredTable", "place"]

log = logging.getLogger(__name__)

_FLOAT_TABLES, _CODE_TABLES = ("f32", "f16", "bf16"), ("u8", "u4")


def _bytes_of(constant) -> np.ndarray:
    """The stored bytes of ``constant`` as a flat u8 array over its memory (a mapping of the model's
    file), which keeps the constant, and so that memory, alive."""
    view = constant.get_tensor_view().data  # shares the constant's memory
    return owned_bytes(view.ctypes.data, constant.get_byte_size(), constant)


def _constant(value):
    """The Constant behind ``value`` (directly or through one Convert), else None."""
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def _skip(node, type_name: str):
    return node.input_value(0).get_node() if node.get_type_name() == type_name else node


def _decompressed_table(gather):
    """(codes, scale, zero point) Constants behind the table Gather's data input, scale and zero point
    None for a float table; None for any graph this module does not know."""
    node = _skip(_skip(gather.input_value(0).get_node(), "Convert"), "Reshape")
    if node.get_type_name() == "Constant":
        return node, None, None
    if node.get_type_name() != "Multiply":
        return None
    values = node.input_values()
    for value, scale in ((values[0], _constant(values[1])), (values[1], _constant(values[0]))):
        if scale is None:
            continue
        codes_side, zero_point = value.get_node(), None
        if codes_side.get_type_name() == "Subtract":
            zero_point = _constant(codes_side.input_value(1))
            if zero_point is None:
                return None
            codes_side = codes_side.input_value(0).get_node()
        codes = _constant(codes_side.output(0)) if codes_side.get_type_name() == "Convert" else None
        return (codes, scale, zero_point) if codes is not None else None
    return None


def _type(node) -> str:
    return node.get_element_type().get_type_name()


@dataclasses.dataclass
class StoredTable:
    """A lookup stage's table as the row kernel reads it: the Constants of its stored parts (codes
    [R, row bytes], then flat scales and zero points where it has them) and the kernel's attributes."""

    parts: list  # Constants
    attributes: dict

    @property
    def table_rows(self) -> int:
        return int(self.parts[0].get_output_shape(0)[0])

    @property
    def layout(self) -> RowLayout:
        attributes = self.attributes
        groups = attributes["row_size"] // attributes["group_size"]
        zero_value_bits = {"none": 8, "u8": 8, "u4": 4}[attributes["zero_point"]]
        return RowLayout(
            table_rows=self.table_rows,
            row_bytes=self.parts[0].get_byte_size() // self.table_rows,
            scale_bytes=groups * {"none": 0, "f16": 2, "f32": 4, "e8m0": 1}[attributes["scale"]],
            zero_bits=0 if attributes["zero_point"] == "none" else groups * zero_value_bits,
            zero_value_bits=zero_value_bits,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Part name -> its stored bytes, read in place (``codes`` [R, row bytes], the others flat)."""
        names = ["codes"] + ["scales"] * (self.attributes["scale"] != "none")
        names += ["zero_points"] * (self.attributes["zero_point"] != "none")
        arrays = {name: _bytes_of(node) for name, node in zip(names, self.parts, strict=True)}
        arrays["codes"] = arrays["codes"].reshape(self.table_rows, -1)
        return arrays


def _stored_table(element: str, row_size: int, table, scale, zero_point, output_type: str) -> StoredTable | None:
    """The ``StoredTable`` of these constants, or None if their layout is not one the kernel reads (a [R, d]
    or [R, groups, d/groups] table, one scale and zero point per group)."""
    table_rows = table.get_output_shape(0)[0]
    if table_rows < 1 or int(np.prod(table.get_output_shape(0))) != table_rows * row_size:
        return None
    attributes = {
        "element": element,
        "row_size": row_size,
        "scale": "none",
        "group_size": row_size,
        "zero_point": "none",
        "output_type": output_type,
    }
    parts = [table]
    if scale is not None:
        groups = int(np.prod(scale.get_output_shape(0))) // table_rows
        if groups < 1 or row_size % groups or groups * table_rows != int(np.prod(scale.get_output_shape(0))):
            return None
        attributes.update(scale="e8m0" if element == "e4m3" else _type(scale), group_size=row_size // groups)
        parts.append(scale)
    if zero_point is not None:
        if list(zero_point.get_output_shape(0)) != list(scale.get_output_shape(0)):
            return None
        attributes["zero_point"] = _type(zero_point)
        parts.append(zero_point)
    if attributes["scale"] not in ("none", "f16", "f32", "e8m0") or attributes["zero_point"] not in (
        "none",
        "u8",
        "u4",
    ):
        return None
    return StoredTable(parts, attributes)


def place(table: StoredTable, store: TableStore) -> tuple[list[np.ndarray], int]:
    """The stored parts of ``table`` placed in memory by ``store`` (after refusing a table it cannot
    hold), and the id of the tier the reader finds their rows through (0: none)."""
    store.check_fits(sum(node.get_byte_size() for node in table.parts))
    placed = [store.place(_bytes_of(node), node.get_friendly_name()) for node in table.parts]
    return placed, store.tier(placed, table.layout)


def _gather_rows(rows, table: StoredTable, store: TableStore):
    """``EngramGatherRows`` over the stored bytes of ``table``, placed in memory by ``store``; None where
    the op refuses the layout."""
    placed, tier = place(table, store)
    shapes = [(table.table_rows, placed[0].size // table.table_rows)] + [(data.size,) for data in placed[1:]]
    inputs = [rows] + [
        shared_constant(data, (node, data), shape=shape).output(0)
        for node, data, shape in zip(table.parts, placed, shapes, strict=True)
    ]
    attributes = dict(table.attributes)
    if tier:
        attributes["tier"] = tier
    try:
        return make_node("EngramGatherRows", inputs, attributes)
    except RuntimeError as exc:  # the op's own checks refuse a layout read wrongly here: keep the graph
        log.warning("table lookup left to OpenVINO's Gather: %s", str(exc).splitlines()[0])
        return None


def _fp8_decode(gathers, produced):
    """(codes, scales) Constants of the FP8 decode that ends at ``produced``: the two Gathers on the
    hash's rows (E4M3 codes [R, d], E8M0 scales [R, d/32]), then only decode ops, through exactly the
    256-entry tables of ``models.deepseek_v41``; else None."""
    tables = [_constant(g.input_value(0)) for g in gathers]
    if any(t is None or _type(t) != "u8" or len(t.get_output_shape(0)) != 2 for t in tables):
        return None
    codes, scales = sorted(tables, key=lambda t: -t.get_output_shape(0)[1])
    if codes.get_output_shape(0)[1] != 32 * scales.get_output_shape(0)[1]:
        return None
    stop = {g.get_name() for g in gathers}
    seen, stack, luts = set(), [produced.get_node()], []
    while stack:
        node = stack.pop()
        if node.get_name() in seen | stop:
            continue
        seen.add(node.get_name())
        kind = node.get_type_name()
        if kind not in ("Convert", "Gather", "Reshape", "Unsqueeze", "Multiply", "Constant"):
            return None
        if kind == "Gather":
            lut = _constant(node.input_value(0))
            if lut is None or list(lut.get_output_shape(0)) != [256]:
                return None
            luts.append(lut.get_data().astype(np.float32))
        stack += [value.get_node() for value in node.input_values()]
    # A bf16 IR stores the E4M3 table in f16, where its NaN codes (0x7F, 0xFF) became 65504: the kernel
    # decodes them as the spec says (NaN); every other entry must be exactly the spec's.
    expected = sorted(
        [np.asarray(e4m3_values(), np.float32), np.asarray(e8m0_values(), np.float32)],
        key=lambda v: np.nan_to_num(v).max(),
    )
    found = sorted(luts, key=lambda v: np.nan_to_num(v, posinf=0).max())
    if len(found) != 2 or not all(
        np.array_equal(a[~np.isnan(b)], b[~np.isnan(b)]) for a, b in zip(found, expected, strict=True)
    ):
        return None
    return codes, scales


def _find(lookup):
    """(the table, the hash's rows output, the output the kernel's rows replace, and whether they are
    flattened to [B, T, C*d] there) of a lookup stage; None for a graph this module does not know."""
    (hash_op,) = [op for op in lookup.get_ops() if op.get_type_name() == "EngramHash"]
    gathers = [t.get_node() for t in hash_op.output(0).get_target_inputs() if t.get_node().get_type_name() == "Gather"]
    (result,) = lookup.get_results()
    end = result.input_value(0)
    produced, output_type = end, "f32"
    if end.get_node().get_type_name() == "Convert" and _type(end.get_node()) == "bf16":
        produced, output_type = end.get_node().input_value(0), "bf16"
    if len(gathers) == 1:
        gather = gathers[0]
        # DeepSeek-V4.1's float tables: the rows flattened to [B, T, C*d] after the Gather
        flat = (
            produced.get_node().get_type_name() == "Reshape"
            and produced.get_node().input_value(0).get_node().get_name() == gather.get_name()
            and produced.get_partial_shape().rank.get_length() == 3
        )
        parts = _decompressed_table(gather)
        if parts is None or not (flat or produced.get_node().get_name() == gather.get_name()):
            return None
        table, scale, zero_point = parts
        element = _type(table)
        if element not in (_FLOAT_TABLES if scale is None else _CODE_TABLES):
            return None
        row_size = gather.get_output_partial_shape(0)[3].get_length()
        stored = _stored_table(element, row_size, table, scale, zero_point, output_type)
    elif len(gathers) == 2 and produced.get_partial_shape().rank.get_length() == 3:
        fp8 = _fp8_decode(gathers, produced)
        if fp8 is None:
            return None
        codes, scales = fp8
        stored, flat = _stored_table("e4m3", codes.get_output_shape(0)[1], codes, scales, None, output_type), True
    else:
        return None
    return None if stored is None else (stored, hash_op.output(0), end, flat)


def stored_table(lookup) -> StoredTable | None:
    """The table of a lookup stage (``stages.split_stages``) as the row kernel reads it; None for a graph
    it does not know."""
    found = _find(lookup)
    return None if found is None else found[0]


def install(lookup, table_memory: str | TableStore = "mmap") -> bool:
    """Read the table of a lookup stage (``stages.split_stages``) with ``EngramGatherRows`` instead of
    OpenVINO's Gather and decode ops, its bytes placed by the store ``table_memory`` names. Returns False,
    leaving ``lookup`` as it was, for a graph it does not recognise."""
    store = table_store(table_memory)
    found = _find(lookup)
    if found is None:
        return False
    stored, rows, end, flat = found
    node = _gather_rows(rows, stored, store)
    if node is None:
        return False
    end.replace(_flat_rows(node) if flat else node.output(0))
    lookup.validate_nodes_and_infer_types()
    return True


def _flat_rows(node):
    """[B, T, C, d] -> [B, T, C*d]."""
    return ops.reshape(node, np.array([0, 0, -1], np.int64), special_zero=True).output(0)
