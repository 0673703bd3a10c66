"""The row API (``EngramRows``): rows by id in every form, from every table memory, equal to the
checkpoint's bytes, to the reference decode and to the runtime's own lookup, bit for bit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_export import EngramRuntime
from engram_export.core.errors import EngramError
from engram_export.folders.calibration import calibrate
from engram_export.models.table_rows import hashing_of, table_rows
from engram_export.openvino.row_reader import RowReader
from engram_export.runtime.rows import EngramRows
from tests.helpers import package_prose

FP8 = {"element": "e4m3", "row_size": 64, "scale": "e8m0", "group_size": 32, "zero_point": "none"}


def _checkpoint_table(folder: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 codes and E8M0 scales of ``layer`` as the checkpoint under ``folder`` stores them."""
    from safetensors import safe_open

    checkpoint = folder.parent / "ckpt_F8_E4M3"
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = f"layers.{layer}.engram.embed.weight"
    with safe_open(checkpoint / weight_map[name], "pt") as shard:
        return shard.get_tensor(name), shard.get_tensor(name.replace("weight", "scale"))


def _decoded(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference decode, in f32: the E4M3 value times its block's power of two (SGLang's CPU path)."""
    values = codes.float().unflatten(-1, (-1, 32)) * scales.float().unsqueeze(-1)
    return values.flatten(-2)


@pytest.mark.parametrize("table_memory", ["mmap", "populate", "hugepages"])
@pytest.mark.parametrize("folder", ["v41 onnx", "v41 f32"])
def test_every_form_equals_the_checkpoint(text_folders, folder, table_memory):
    rows = EngramRows(text_folders[folder], table_memory=table_memory)
    for layer in rows:
        weight, scale = _checkpoint_table(text_folders[folder], layer)
        table = rows[layer]
        ids = np.random.default_rng(layer).integers(-1, table.table_rows, (7, 24))
        ids[0, :3] = [-1, 0, table.table_rows - 1]
        real = ids >= 0
        packed = rows.read(layer, ids, form="packed")
        codes, scales = rows.read(layer, ids, form="codes"), rows.read(layer, ids, form="scales")
        width = table.row_size
        assert packed.shape == (7, 24, width + width // 32) and table.width("packed") == width + width // 32
        assert np.array_equal(packed[..., :width], codes) and np.array_equal(packed[..., width:], scales)
        assert np.array_equal(codes[real], weight.view(torch.uint8).numpy()[ids[real]])
        assert np.array_equal(scales[real], scale.view(torch.uint8).numpy()[ids[real]])
        assert not packed[~real].any()  # -1: a zero row
        expected = _decoded(weight[torch.from_numpy(ids[real])], scale[torch.from_numpy(ids[real])])
        f32 = rows.read(layer, ids, form="f32")
        assert torch.equal(torch.from_numpy(f32[real]), expected) and not f32[~real].any()
        bf16 = torch.empty(7, 24, width, dtype=torch.bfloat16)
        assert rows.read(layer, torch.from_numpy(ids).int(), bf16, form="bf16") is bf16
        assert torch.equal(bf16[torch.from_numpy(real)], expected.to(torch.bfloat16))
        bits = rows.read(layer, ids, form="bf16")  # numpy: bf16 as its bits
        assert bits.dtype == np.uint16 and np.array_equal(bits, bf16.view(torch.int16).numpy().view(np.uint16))


def test_owned_rows_and_the_engines_buffers(text_folders):
    """A tensor-parallel rank's share (``owned``): the others are zero rows. Output into a strided torch
    buffer as vLLM's packed lookup gets it ([tokens, layers, heads, 264] sliced at one layer)."""
    rows = EngramRows(text_folders["v41 f32"])
    layer = rows.layer_ids[0]
    table = rows[layer]
    ids = torch.from_numpy(np.random.default_rng(0).integers(-1, table.table_rows, (9, 24))).int()
    start, stop = table.table_rows // 3, 2 * table.table_rows // 3
    whole = rows.read(layer, ids, form="packed")
    staged = torch.full((9, 2, 24, table.width("packed")), 7, dtype=torch.uint8)
    rows.read(layer, ids, staged[:, 1], form="packed", owned=(start, stop))
    mine = ((ids >= start) & (ids < stop)).numpy()
    assert np.array_equal(staged[:, 1].numpy()[mine], whole[mine]) and not staged[:, 1].numpy()[~mine].any()
    assert (staged[:, 0] == 7).all()  # nothing written outside the slice


def test_rows_equal_the_runtime_lookup(text_folders):
    """The rows the runtime's lookup stage gathers for real ids (both families, f32 and u4 tables),
    read by id through the row API: equal bit for bit."""
    for name in ("demo f32", "demo u4", "v41 f32"):
        runtime, rows = EngramRuntime(text_folders[name]), EngramRows(text_folders[name])
        hashing = hashing_of(runtime.config)
        ids = np.random.default_rng(1).integers(0, runtime.config.vocab_size, (3, 11))
        for layer in runtime:
            hashed = table_rows(hashing, ids, None, layer)
            looked_up = runtime[layer].lookup(ids)
            assert np.array_equal(rows.read(layer, hashed, form="f32").reshape(looked_up.shape), looked_up), name


def test_every_e8m0_byte_decodes_as_the_spec_or_as_vllm():
    """All 256 codes x all 256 scale bytes: ``e8m0="spec"`` is PyTorch's float8_e8m0fnu (2^-127 for
    byte 0, NaN for 255), ``"vllm"`` vLLM's kernel (the float whose exponent bits the byte is: 0, inf)."""
    codes = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # row r: every code, scale byte r
    scales = np.repeat(np.arange(256, dtype=np.uint8), 256 // 32 * 0 + 8)
    reader = RowReader(FP8 | {"row_size": 256}, 256, [codes, scales])
    ids = np.arange(256, dtype=np.int64)
    as_fp8 = torch.from_numpy(codes).view(torch.float8_e4m3fn).float()
    spec = as_fp8 * torch.from_numpy(np.arange(256, dtype=np.uint8)).view(torch.float8_e8m0fnu).float()[:, None]
    vllm = as_fp8 * torch.from_numpy((np.arange(256, dtype=np.uint32) << 23).view(np.float32))[:, None]
    for e8m0, expected in (("spec", spec), ("vllm", vllm)):
        out = np.empty((256, 256), np.float32)
        reader.read(ids, out, "f32", e8m0=e8m0)
        assert torch.equal(torch.from_numpy(out).nan_to_num(7.0), expected.nan_to_num(7.0)), e8m0
        bf16 = torch.empty(256, 256, dtype=torch.bfloat16)
        reader.read(ids, bf16, "bf16", e8m0=e8m0)
        assert torch.equal(bf16.nan_to_num(7.0), expected.to(torch.bfloat16).nan_to_num(7.0)), e8m0


@pytest.mark.parametrize("hot_set_memory", ["private", "shared"])
def test_tiered_rows_with_misses_and_a_cache(text_folders, tmp_path, hot_set_memory):
    """A calibrated folder: hot rows from memory (a private copy, or the hot set files' pages, shared by
    every process that maps them), the others read from the file (and cached), the same bytes as the
    whole table's; the counters say where they came from."""
    from engram_export.openvino.memory import file_mappings

    text = tmp_path / "prose.txt"
    text.write_text(package_prose()[:60_000])
    calibrated = tmp_path / "calibrated"
    calibrate(text_folders["v41 f32"], calibrated, [text], "30%")
    whole = EngramRows(calibrated, table_memory="populate")
    tiered = EngramRows(calibrated, table_memory="tiered", cache_budget="16KiB", hot_set_memory=hot_set_memory)
    hot_files = {m.path for m in file_mappings() if ".hot." in m.path and m.path.startswith(str(calibrated))}
    assert bool(hot_files) == (hot_set_memory == "shared"), hot_files
    for layer in whole:
        ids = np.random.default_rng(layer).integers(-1, whole[layer].table_rows, (64, 24))
        for _ in range(2):  # again: some rows from the cache now
            for form in ("packed", "bf16", "codes"):
                assert np.array_equal(tiered.read(layer, ids, form=form), whole.read(layer, ids, form=form))
        stats = tiered[layer].stats()
        assert stats["hot_hits"] > 0 and stats["rows_read"] > 0 and stats["cache_hits"] > 0, stats
        assert stats["reads"] == 6 and stats["rows"] == 6 * ids.size


def test_start_and_wait_from_threads(text_folders):
    rows = EngramRows(text_folders["v41 f32"], table_memory="mmap")
    layer = rows.layer_ids[-1]
    size = rows[layer].table_rows
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for _ in range(30):
                ids = rng.integers(-1, size, (int(rng.integers(1, 65)), 24))
                pending = [rows.start(layer, ids, form=form) for form in ("packed", "f32")]
                packed, f32 = (p.wait() for p in pending)
                assert np.array_equal(packed, rows.read(layer, ids, form="packed"))
                assert np.array_equal(f32, rows.read(layer, ids, form="f32"), equal_nan=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_start_reads_ids_written_until_ready(text_folders):
    """``start(..., ready=)`` (ids a GPU copy is still writing): the ids are read as they are once ``ready``
    returned, their range checked then, and one out of the table is raised by ``wait`` in one line."""
    rows = EngramRows(text_folders["v41 f32"])
    layer = rows.layer_ids[0]
    size = rows[layer].table_rows
    landed = threading.Event()
    ids = np.zeros((8, 24), np.int64)
    pending = rows.start(layer, ids, form="packed", ready=landed.wait)
    written = np.random.default_rng(4).integers(-1, size, ids.shape)
    ids[:] = written  # the copy lands after the read was issued
    landed.set()
    assert np.array_equal(pending.wait(), rows.read(layer, written, form="packed"))

    landed.clear()
    ids = np.zeros((8, 24), np.int64)
    out = np.full((8, 24, rows[layer].width("packed")), 9, np.uint8)
    pending = rows.start(layer, ids, out, form="packed", ready=landed.wait)
    ids[3, 2] = size
    landed.set()
    with pytest.raises(EngramError, match=rf"row id {size} \(at index 74\) is outside the table") as error:
        pending.wait()
    assert "\n" not in str(error.value) and (out == 9).all()


def test_refusals_are_one_line_and_read_nothing(text_folders, tmp_path):
    rows = EngramRows(text_folders["v41 f32"])
    layer = rows.layer_ids[0]
    size = rows[layer].table_rows
    out = np.full((2, 3, 66), 9, np.uint8)
    cases = [
        (np.array([[0, 1, size], [0, 0, 0]]), r"row id 4038 \(at index 2\) is outside the table's 4038 rows"),
        (np.array([[0, -2, 0], [0, 0, 0]]), r"row id -2 \(at index 1\)"),
        (np.zeros((2, 3), np.float32), "ids must be int32 or int64, got float32"),
        (np.zeros((3, 2), np.int64).T, "ids must be C-contiguous"),
    ]
    for ids, message in cases:
        with pytest.raises(EngramError, match=message):
            rows.read(layer, ids, out, form="packed")
        assert (out == 9).all()  # refused before anything is written
    with pytest.raises(EngramError, match=r"row id 4038 \(at index 2\)"):
        rows.start(layer, cases[0][0], out, form="packed")  # refused at start, not at wait
    ids = np.zeros((2, 3), np.int64)
    for kwargs, message in [
        ({"form": "fp8"}, "form must be one of f32, bf16, packed, codes, scales, got 'fp8'"),
        ({"form": "bf16"}, r"out must be bfloat16 \[2, 3, 64\] for bf16 rows of ids \[2, 3\], got uint8 \[2, 3, 66\]"),
        ({"form": "packed", "owned": (5, 1)}, "owned must be"),
        ({"form": "f32", "e8m0": "ocp"}, "e8m0 must be one of spec, vllm"),
    ]:
        with pytest.raises(EngramError, match=message):
            rows.read(layer, ids, out, **kwargs)
    with pytest.raises(EngramError, match="out must be in host memory|out must be a numpy array"):
        rows.read(layer, ids, [[0]], form="packed")
    with pytest.raises(EngramError, match="ids must be a numpy array or a torch tensor, got list"):
        rows.read(layer, [[0]], form="packed")
    with pytest.raises(EngramError, match=r"no Engram layer 2 here \(layers: \[1, 3\]\)"):
        rows.read(2, ids)
    with pytest.raises(EngramError, match="EngramRows takes table_memory, .*; not precision"):
        EngramRows(text_folders["v41 f32"], precision="bf16")
    with pytest.raises(EngramError, match="is not a folder"):
        EngramRows(tmp_path / "nothing")
    with pytest.raises(EngramError, match="table_memory must be one of"):
        EngramRows(text_folders["v41 f32"], table_memory="ssd")
    with pytest.raises(EngramError, match="hot_set_memory must be one of private, shared, got 'disk'"):
        EngramRows(text_folders["v41 f32"], hot_set_memory="disk")
    with pytest.raises(EngramError, match="table_memory='tiered' serves the hot set|never calibrated|calibrate"):
        EngramRows(text_folders["v41 f32"], table_memory="tiered")


@pytest.mark.slow
def test_the_gpu_host_script_on_the_plugins_cpu_branch(text_folders):
    """``samples/engines_gpu_check.py rows`` (docs/engines.md), run with ``--device cpu``: the plug-ins'
    lookups (vLLM's background one too) equal the checkpoint's bytes and both engines' decodes of them, for
    every layer."""
    import os
    import subprocess
    import sys

    folder = text_folders["v41 f32"]
    script = Path(__file__).parent.parent / "samples" / "engines_gpu_check.py"
    arguments = ["rows", "--checkpoint", folder.parent / "ckpt_F8_E4M3", "--folder", folder, "--device", "cpu"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ENGRAM_EXPORT_")}
    done = subprocess.run(
        [sys.executable, script, *arguments, "--rounds", "5"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("rows equal the checkpoint") == 8 and "DIFFER" not in done.stdout, done.stdout


def test_prefetch_and_the_record_of_each_call(text_folders, tmp_path):
    """Rows read ahead with ``prefetch`` are served from the cache and counted as candidates, once; each
    call's record says how long its caller waited and where its lookups came from, and adds up."""
    text = tmp_path / "prose.txt"
    text.write_text(package_prose()[:60_000])
    calibrated = tmp_path / "calibrated"
    calibrate(text_folders["v41 f32"], calibrated, [text], "30%")
    whole = EngramRows(calibrated, table_memory="populate")
    tiered = EngramRows(calibrated, table_memory="tiered", cache_budget="1MiB")
    layer = tiered.layer_ids[0]
    ids = np.random.default_rng(3).integers(0, tiered[layer].table_rows, (8, 24))
    ids[0, 0] = -1
    read_ahead = tiered[layer].prefetch(ids).wait()
    assert read_ahead > 0 and tiered[layer].stats()["warm_rows_read"] == read_ahead
    assert tiered[layer].prefetch(ids).wait() == 0  # in memory already: nothing to read
    assert np.array_equal(tiered.read(layer, ids, form="packed"), whole.read(layer, ids, form="packed"))
    record = tiered[layer].recent()[-1]
    assert record["rows"] == ids.size and record["wait_us"] > 0
    assert record["read"] == 0 and record["candidate"] > 0 and record["hot"] > 0, record
    assert record["hot"] + record["cache"] + record["candidate"] == ids.size - 1, record  # -1 is no lookup
    pending = tiered.start(layer, ids, form="packed")
    pending.wait()
    again = tiered[layer].recent()[-1]
    assert again["candidate"] == 0 and again["cache"] == record["candidate"] + record["cache"], again
    assert len(tiered[layer].recent()) == 2 and whole[layer].recent()[-1]["resident"] == ids.size - 1
    assert whole[layer].prefetch(ids).wait() == 0  # a table held whole: nothing to read ahead
    with pytest.raises(EngramError, match="open it with a cache_budget"):
        EngramRows(calibrated, table_memory="tiered")[layer].prefetch(ids)
    before = tiered[layer].stats()
    with pytest.raises(EngramError, match="outside the table"):
        tiered[layer].prefetch(ids + tiered[layer].table_rows)
    assert tiered[layer].stats() == before
    # cancelled at once: whatever it read before it saw the cancel, a second prefetch reads the rest
    more = np.arange(3000, 3000 + 64 * 40) % tiered[layer].table_rows
    cancelled, whole_read = (EngramRows(calibrated, table_memory="tiered", cache_budget="1MiB") for _ in range(2))
    first = cancelled[layer].prefetch(more)
    first.cancel()
    assert first.wait() + cancelled[layer].prefetch(more).wait() == whole_read[layer].prefetch(more).wait() > 0
