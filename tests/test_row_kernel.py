"""The row-gather kernel (``EngramGatherRows``) that the runtime puts in place of OpenVINO's table Gather.

For every stored table form it must give OpenVINO's own lookup bit for bit in f32 (the same f32
arithmetic: (code - zero point) * scale, or an exact FP8 decode), and in bf16 the correctly rounded
(nearest even) bf16 of that f32 value, which OpenVINO's bf16 path does not always give (it rounds the
scale or the value twice). Table memory modes change where the bytes live, never a value.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.folders import compile_folder, export_checkpoint
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.openvino import memory, precision, row_kernel, table_store
from engram_export.openvino.quantize import QuantizeOptions, quantize
from engram_export.runtime import EngramRuntime
from tests.v41_spec import TINY

SHAPES = [(50, 14), (1, 1), (3, 17)]
V41_LAYER = 3


@pytest.fixture(scope="module")
def demo_models(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """Demo-family lookups over f32, f16 (bf16 IR), u8 and u4 tables."""
    folder = tmp_path_factory.mktemp("row_kernel")
    return {
        "f32 table": tiny_files["f32"],
        "f16 table": tiny_files["bf16"],
        "u8 table": quantize(tiny_files["onnx"], folder / "u8.xml", QuantizeOptions("int8-weights")),
        "u4 table": quantize(
            tiny_files["onnx"], folder / "u4.xml", QuantizeOptions("int4-weights", group_size=16, table_bits=4)
        ),
    }


@pytest.fixture(scope="module")
def v41_models(tmp_path_factory) -> dict[str, Path]:
    """DeepSeek-V4.1 lookups over FP8 (E8M0 block scales), bf16 and f32 tables."""
    models = {}
    for dtype, name in (("F8_E4M3", "fp8 table"), ("BF16", "bf16 table"), ("F32", "f32 table (v4.1)")):
        root = tmp_path_factory.mktemp(f"row_kernel_{dtype}")
        checkpoint = write_v41_checkpoint(root / "checkpoint", TINY, seed=2, tokenizer=True, table_dtype=dtype)
        exported = export_checkpoint(checkpoint, root / "onnx")
        models[name] = compile_folder(exported, root / "f32", "f32")
        if dtype == "F8_E4M3":  # a bf16 IR keeps the E4M3 decode table in f16 (NaN codes become 65504)
            models["fp8 table, bf16 IR"] = compile_folder(exported, root / "bf16", "bf16")
    return models


def _ids(runtime, shape, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, runtime.info.num_ids, shape)
    return (ids, rng.random(shape) > 0.2) if runtime.info.takes_mask else (ids, None)


def _layer(path: Path, **options):
    runtime = EngramRuntime(path, **options)
    return runtime.layer(V41_LAYER) if path.is_dir() else runtime


def _all_models(demo_models, v41_models):
    return {**demo_models, **v41_models}


@pytest.mark.parametrize(
    "name",
    [
        "f32 table",
        "f16 table",
        "u8 table",
        "u4 table",
        "fp8 table",
        "fp8 table, bf16 IR",
        "bf16 table",
        "f32 table (v4.1)",
    ],
)
def test_kernel_equals_openvino_gather_in_f32(demo_models, v41_models, name):
    path = _all_models(demo_models, v41_models)[name]
    kernel, gather = _layer(path, precision="f32"), _layer(path, precision="f32", lookup_kernel=False)
    assert kernel.settings["lookup"] == "row kernel, table mmap"
    assert gather.settings["lookup"] == "openvino gather"
    for i, shape in enumerate(SHAPES):
        ids, mask = _ids(kernel, shape, i)
        np.testing.assert_array_equal(kernel.lookup(ids, mask), gather.lookup(ids, mask), err_msg=f"{name} {shape}")


def _bf16_nearest_even(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return rounded.view(np.float32)


@pytest.mark.parametrize(
    "name", ["f32 table", "f16 table", "u8 table", "u4 table", "fp8 table", "fp8 table, bf16 IR", "bf16 table"]
)
def test_kernel_rounds_bf16_to_nearest_even(demo_models, v41_models, name, monkeypatch):
    """The kernel's own bf16 output, on every CPU: where OpenVINO has no bf16 kernels the runtime would
    build f32 stages (test_precision.py), so the capabilities are made to list BF16 here (the lookup
    stage is the extension's kernel alone, which writes bf16 itself)."""
    capabilities = precision.capabilities()
    monkeypatch.setattr(precision, "capabilities", lambda device="CPU": (*capabilities, "BF16"))
    path = _all_models(demo_models, v41_models)[name]
    exact, bf16 = _layer(path, precision="f32"), _layer(path, precision="bf16")
    ids, mask = _ids(exact, (50, 14), 7)
    np.testing.assert_array_equal(bf16.lookup(ids, mask), _bf16_nearest_even(exact.lookup(ids, mask)))


@pytest.mark.parametrize("table_memory", ["populate", "hugepages"])
@pytest.mark.parametrize("name", ["u8 table", "fp8 table"])
def test_table_memory_changes_no_value(demo_models, v41_models, name, table_memory):
    path = _all_models(demo_models, v41_models)[name]
    mapped, placed = _layer(path), _layer(path, table_memory=table_memory)
    assert placed.settings["lookup"] == f"row kernel, table {table_memory}"
    ids, mask = _ids(mapped, (50, 14), 3)
    hidden = np.random.default_rng(3).standard_normal(
        (50, 14, mapped.config.hc_mult, mapped.config.hidden_size), dtype=np.float32
    )
    np.testing.assert_array_equal(placed.lookup(ids, mask), mapped.lookup(ids, mask))
    np.testing.assert_array_equal(placed(ids, hidden, mask), mapped(ids, hidden, mask))


def test_bad_table_memory_is_refused(demo_models):
    with pytest.raises(EngramError, match="table_memory must be one of mmap, populate, hugepages"):
        EngramRuntime(demo_models["u8 table"], table_memory="swap")
    with pytest.raises(EngramError, match="lookup_kernel must be True or False"):
        EngramRuntime(demo_models["u8 table"], lookup_kernel="yes")


def _run_op(rows, table, scales, zeros, attributes, output_type="f32"):
    """EngramGatherRows alone, on constants."""
    import openvino
    from openvino import opset13 as ops

    from engram_export.openvino.extension import make_node, openvino_core

    parameter = ops.parameter([-1, -1, -1], np.int32, name="rows")
    inputs = [parameter.output(0)] + [ops.constant(a).output(0) for a in (table, scales, zeros) if a is not None]
    node = make_node("EngramGatherRows", inputs, {**attributes, "output_type": output_type})
    model = openvino.Model([node.output(0)], [parameter])
    compiled = openvino_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request().infer([rows])[0]


def test_u4_codes_and_zero_points_packed_across_rows():
    """An odd number of rows with one u4 zero point each: a zero point's nibble shares its byte with
    the next row's (OpenVINO packs u4 low nibble first, across rows), and f16 scales per group of 4."""
    rng = np.random.default_rng(0)
    count, width, group = 5, 8, 8
    codes = rng.integers(0, 16, (count, width)).astype(np.uint8)
    zeros = rng.integers(0, 16, count).astype(np.uint8)
    scales = rng.random(count).astype(np.float16)
    pack = lambda nibbles: (nibbles[0::2] | (np.append(nibbles, 0)[1::2] << 4)).astype(np.uint8)  # noqa: E731
    rows = rng.integers(0, count, (2, 3, 4)).astype(np.int32)
    got = _run_op(
        rows,
        pack(codes.ravel()).reshape(count, -1),
        scales.view(np.uint8),
        pack(zeros),
        {"element": "u4", "row_size": width, "scale": "f16", "group_size": group, "zero_point": "u4"},
    )
    expected = (codes.astype(np.float32) - zeros[:, None]) * scales.astype(np.float32)[:, None]
    np.testing.assert_array_equal(got, expected[rows])


def test_u8_groups_with_f32_scales():
    rng = np.random.default_rng(1)
    count, width, group = 7, 12, 4
    codes = rng.integers(0, 256, (count, width)).astype(np.uint8)
    zeros = rng.integers(0, 256, (count, width // group)).astype(np.uint8)
    scales = rng.standard_normal((count, width // group)).astype(np.float32)
    rows = rng.integers(0, count, (3, 2, 5)).astype(np.int32)
    got = _run_op(
        rows,
        codes,
        scales.view(np.uint8).ravel(),
        zeros.ravel(),
        {"element": "u8", "row_size": width, "scale": "f32", "group_size": group, "zero_point": "u8"},
    )
    expected = (codes.astype(np.float32).reshape(count, -1, group) - zeros[..., None]) * scales[..., None]
    np.testing.assert_array_equal(got, expected.reshape(count, width)[rows])


def test_fp8_decode_covers_every_code_and_scale():
    """All 256 E4M3 codes (NaN, subnormals, both zeros) against the reference decode tables, scaled by
    E8M0 powers of two from 2^-127 (a float subnormal) to 2^127 and NaN."""
    from engram_export.models.deepseek_v41_config import e4m3_values, e8m0_values

    codes = np.arange(256, dtype=np.uint8).reshape(8, 32)
    scale_codes = np.array([0, 1, 100, 127, 130, 200, 254, 255], np.uint8)
    rows = np.arange(8, dtype=np.int32).reshape(1, 1, 8)
    got = _run_op(
        rows,
        codes,
        scale_codes,
        None,
        {"element": "e4m3", "row_size": 32, "scale": "e8m0", "group_size": 32, "zero_point": "none"},
    )
    with np.errstate(over="ignore"):  # 448 * 2^127 is inf, in the kernel as in float32 numpy
        expected = (
            np.asarray(e4m3_values(), np.float32)[codes] * np.asarray(e8m0_values(), np.float32)[scale_codes][:, None]
        )
    np.testing.assert_array_equal(got[0, 0], expected)


def test_op_refuses_rows_out_of_range_and_bad_layouts():
    table = np.zeros((4, 8), np.uint8)
    attributes = {"element": "u8", "row_size": 8, "scale": "f32", "group_size": 8, "zero_point": "none"}
    scales = np.ones(4, np.float32).view(np.uint8)
    with pytest.raises(RuntimeError, match="row 4 is out of range"):
        _run_op(np.array([[[0, 4]]], np.int32), table, scales, None, attributes)
    with pytest.raises(RuntimeError, match="element must be"):
        _run_op(np.zeros((1, 1, 1), np.int32), table, scales, None, {**attributes, "element": "i3"})
    with pytest.raises(RuntimeError, match="scales must be one f32 per group"):
        _run_op(np.zeros((1, 1, 1), np.int32), table, scales[:8], None, attributes)
    with pytest.raises(RuntimeError, match="needs a scale"):
        _run_op(np.zeros((1, 1, 1), np.int32), table, None, None, {**attributes, "scale": "none"})


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_populate_maps_every_page_and_mmap_none(tmp_path):
    path = tmp_path / "table.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 64 << 20, np.uint8).tobytes())
    lazy = np.memmap(path, np.uint8, "r")
    before = _rss_file_mib()
    memory.madvise(lazy, mmap.MADV_RANDOM)
    assert _rss_file_mib() - before < 8
    eager = np.memmap(path, np.uint8, "r")
    before = _rss_file_mib()
    memory.populate(eager, "table")
    assert _rss_file_mib() - before > 60


def test_huge_page_copy_is_equal_aligned_and_backed_by_huge_pages():
    data = np.random.default_rng(0).integers(0, 256, 16 << 20, np.uint8)
    copy = table_store.HugePagesStore().place(data, "table")
    np.testing.assert_array_equal(copy, data)
    assert copy.ctypes.data % (2 << 20) == 0
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not enabled.exists() or "[never]" in enabled.read_text():
        return  # the copy is still correct and aligned; the kernel gives no huge pages here
    start, huge = copy.ctypes.data, 0
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and len(line.split()[0].split("-")) == 2 and ":" not in line.split()[0]:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            mapping = low <= start < high
        elif mapping and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
    assert huge >= 2048, "no transparent huge pages behind the copy"


def _lookup_with(after):
    """A lookup stage: EngramHash -> Gather on an f32 table -> ``after`` -> Result."""
    import openvino
    from openvino import opset13 as ops

    from engram_export.openvino.extension import make_node

    ids = ops.parameter([-1, -1], np.int64, name="input_ids")
    lut = ops.constant(np.arange(100, dtype=np.int64))
    rows = make_node(
        "EngramHash",
        [ids.output(0), lut.output(0)],
        {"multipliers": [3, 5], "primes": [7, 11], "pad_id": 0, "n_head_per_ngram": 2, "blocking": 0},
    )
    table = ops.constant(np.random.default_rng(0).standard_normal((18, 4)).astype(np.float32))
    return openvino.Model([after(ops.gather(table, rows, 0))], [ids])


def test_install_leaves_an_unknown_graph_alone():
    from openvino import opset13 as ops

    model = _lookup_with(lambda values: ops.multiply(values, np.float32(2)))  # not a lookup stage's end
    before = sorted(op.get_type_name() for op in model.get_ops())
    assert row_kernel.install(model) is False
    assert sorted(op.get_type_name() for op in model.get_ops()) == before
    plain = _lookup_with(lambda values: values)
    assert row_kernel.install(plain) is True
    assert "EngramGatherRows" in {op.get_type_name() for op in plain.get_ops()}
    with pytest.raises(EngramError, match="table_memory must be one of"):
        row_kernel.install(_lookup_with(lambda values: values), "disk")


def test_lookup_bench_prints_every_form_and_memory_mode(tmp_path, capsys):
    import dataclasses

    from engram_export.measure.bench_lookup import DEMO, V41, run_lookup_bench

    small = (dataclasses.replace(DEMO, table_rows=16 * 2000), dataclasses.replace(V41, table_rows=24 * 500))
    checks = run_lookup_bench(tmp_path, [(2, 3)], repeat=2, warmup=1, lookups=small)
    out = capsys.readouterr().out
    for form in ("f32", "f16", "u8", "u4", "bf16", "fp8"):
        assert f"  {form} " in out, form
    for mode in ("mmap", "populate", "hugepages"):
        assert f"\n{mode} " in out, mode
    assert len(checks) == 3 and all(("met" in line) or ("MISSED" in line) for line in checks)


@pytest.mark.parametrize("table_memory", ["populate", "hugepages"])
def test_a_table_larger_than_free_memory_is_refused_for_ram_modes(demo_models, monkeypatch, table_memory):
    monkeypatch.setattr(table_store, "_available_bytes", lambda: 4096)
    with pytest.raises(
        EngramError, match=f"table_memory='{table_memory}' holds the table in RAM: .* use table_memory='mmap'"
    ):
        EngramRuntime(demo_models["u8 table"], table_memory=table_memory)
    assert EngramRuntime(demo_models["u8 table"]).settings["lookup"] == "row kernel, table mmap"  # any size
