"""``engram-export bench lookup`` (and the end of ``bench layer``): every stored table form, the row
kernel against OpenVINO.

Each lookup stage is built as an IR holds it (``EngramHash`` -> ``Gather`` on the table, behind NNCF's
decompression nodes or the FP8 decode ops), over a table of the real row shape (demo: 16 rows of 64
values per token; DeepSeek-V4.1: 24 rows of 256) and as many rows as fit in memory here, stored in a
file and mapped as the runtime maps an IR's ``.bin``. Timed round-robin with fresh ids every call:

- the floor: OpenVINO's plain ``Gather`` on the same rows of a resident f32 table;
- per form, OpenVINO's own path (``lookup_kernel=False`` in the runtime) and the row kernel;
- per ``table_memory`` (u8 table): load time, the first calls after load (page faults of a fresh
  mapping), and the resident memory it adds.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import openvino
from openvino import opset13 as ops

from engram_export.core.errors import EngramError
from engram_export.measure.common import format_table, resident_mib, round_robin_ms, target_line
from engram_export.models.deepseek_v41_config import e4m3_values, e8m0_values
from engram_export.openvino import row_kernel
from engram_export.openvino.extension import make_node, openvino_core
from engram_export.openvino.memory import populate
from engram_export.openvino.tables import shared_constant

__all__ = ["run_lookup_bench", "print_targets", "shapes_for", "LookupShape", "DEMO", "V41"]

_VOCAB = 1 << 20


@dataclasses.dataclass(frozen=True)
class LookupShape:
    name: str
    orders: int  # n-gram orders hashed (max_ngram_size - 1)
    heads: int  # heads per order
    row_size: int  # values per row
    table_rows: int  # rows of the table in this benchmark
    forms: tuple[str, ...]

    @property
    def columns(self) -> int:
        return self.orders * self.heads


DEMO = LookupShape("demo", 2, 8, 64, 10_342_400, ("f32", "f16", "u8", "u4"))  # 646,400 rows x 16 heads
V41 = LookupShape("v4.1", 3, 8, 256, 2_000_000, ("f32", "bf16", "fp8"))  # 2M of 384M rows: fits in RAM here


def shapes_for(config) -> tuple[LookupShape, LookupShape]:
    """The lookup of a demo-family ``config`` (its heads, row width and table size), and the V4.1 row
    shape over at most as many rows (deepseek-demo dims: ``DEMO`` and ``V41``; small configs stay small)."""
    rows = config.n_head_per_ngram * sum(config.engram_vocab_size)
    demo = LookupShape("demo", config.max_ngram_size - 1, config.n_head_per_ngram, config.head_dim, rows, DEMO.forms)
    return demo, dataclasses.replace(V41, table_rows=min(V41.table_rows, rows))


def _hash(ids, shape: LookupShape):
    """EngramHash (demo hashing) over ids in [0, 2^20) -> rows in [0, table_rows)."""
    rng = np.random.default_rng(0)
    multipliers = (rng.integers(1, 2**31, shape.orders + 1) * 2 + 1).tolist()
    per_head = shape.table_rows // shape.columns
    primes = [per_head] * shape.columns
    lut = ops.constant(np.arange(_VOCAB, dtype=np.int64))
    attributes = {
        "multipliers": [int(m) for m in multipliers],
        "primes": [int(p) for p in primes],
        "pad_id": 0,
        "n_head_per_ngram": shape.heads,
        "blocking": 0,
    }
    return make_node("EngramHash", [ids, lut.output(0)], attributes).output(0)


def _stored(path: Path, make, resident: bool) -> np.ndarray:
    """The table bytes ``make()`` gives, written to ``path`` once, mapped read-only; with ``resident``,
    every page mapped in now (no page faults while timed)."""
    if not path.exists():
        data = make()
        data.tofile(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    mapped = np.memmap(path, np.uint8, "r")
    return populate(mapped, path.name) if resident else mapped


def _constant(data: np.ndarray, kind: str, shape):

    return shared_constant(data, data, kind, shape)


def _lookup_model(shape: LookupShape, form: str, folder: Path, resident: bool):
    """The lookup stage of ``form`` as an IR holds it: [B,T] ids -> [B,T,C,d] (demo) or [B,T,C*d]."""
    rng = np.random.default_rng(1)
    rows_count, width = shape.table_rows, shape.row_size
    ids = ops.parameter([-1, -1], np.int64, "input_ids")
    ids.output(0).set_names({"input_ids"})
    rows = _hash(ids.output(0), shape)
    file = folder / f"{shape.name}_{form}_{rows_count}x{width}.bin"

    def normal(dtype):
        return lambda: rng.standard_normal((rows_count, width), np.float32).astype(dtype).view(np.uint8)

    def bf16_normal():  # the upper half of each f32: bf16 bits
        values = rng.standard_normal((rows_count, width), np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)

    def codes(count, high=256):
        return lambda: rng.integers(0, high, count, np.uint8)

    if form in ("f32", "f16", "bf16"):
        kind = {"f32": "f32", "f16": "f16", "bf16": "bf16"}[form]
        make = bf16_normal if form == "bf16" else normal(np.float32 if form == "f32" else np.float16)
        table = _constant(_stored(file, make, resident), kind, [rows_count, width])
        data = table if form == "f32" else ops.convert(table, np.float32)
        values = ops.gather(data, rows, 0)
    elif form in ("u8", "u4"):
        # NNCF's per-row asymmetric compression: f16 (codes - zero point) * f16 scale, then f32
        code_bytes, zero_bytes = (
            (rows_count * width, rows_count) if form == "u8" else (rows_count * width // 2, (rows_count + 1) // 2)
        )
        store = _stored(
            file,
            lambda: np.concatenate(
                [
                    codes(code_bytes)(),
                    codes(zero_bytes)(),
                    rng.uniform(1e-3, 1e-2, rows_count).astype(np.float16).view(np.uint8),
                ]
            ),
            resident,
        )
        grouped, per_row = (
            ([rows_count, 1, width], [rows_count, 1, 1]) if form == "u4" else ([rows_count, width], [rows_count, 1])
        )
        code = _constant(store[:code_bytes], form, grouped)
        zero = _constant(store[code_bytes : code_bytes + zero_bytes], form, per_row)
        scale = _constant(store[code_bytes + zero_bytes :], "f16", per_row)
        decoded = ops.multiply(ops.subtract(ops.convert(code, np.float16), ops.convert(zero, np.float16)), scale)
        if form == "u4":
            decoded = ops.reshape(decoded, np.array([rows_count, width], np.int64), False)
        values = ops.gather(ops.convert(decoded, np.float32), rows, 0)
    else:  # fp8: the ops engram.HashGatherFP8 becomes (the extension's convert_hash_gather_fp8)
        store = _stored(
            file,
            lambda: np.concatenate(
                [
                    codes(rows_count * width)() & 0xF7,  # no NaN codes
                    codes(rows_count * width // 32, 8)() + 120,
                ]
            ),
            resident,
        )
        table = _constant(store[: rows_count * width], "u8", [rows_count, width])
        scales = _constant(store[rows_count * width :], "u8", [rows_count, width // 32])

        def decode(byte_codes, lut):
            return ops.gather(ops.constant(np.asarray(lut, np.float32)), ops.convert(byte_codes, np.int32), 0)

        blocks = ops.reshape(
            decode(ops.gather(table, rows, 0), e4m3_values()), np.array([0, 0, 0, -1, 32], np.int64), True
        )
        scale = ops.unsqueeze(decode(ops.gather(scales, rows, 0), e8m0_values()), np.array([-1], np.int64))
        values = ops.multiply(blocks, scale)
    if shape.name == "v4.1":
        values = ops.reshape(values, np.array([0, 0, -1], np.int64), True)
    return openvino.Model([values], [ids], f"lookup_{form}")


class _Compiled:
    """One lookup stage compiled for CPU in f32, with or without the row kernel."""

    def __init__(self, shape, form, folder, kernel: bool, table_memory: str = "mmap", resident: bool = True):
        before, start = resident_mib(), time.perf_counter()
        model = _lookup_model(shape, form, folder, resident)
        if kernel and not row_kernel.install(model, table_memory):
            raise EngramError(f"bench: the row kernel did not take the {form} table (see the log)")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        self.request = openvino_core().compile_model(model, "CPU", config).create_infer_request()
        self.load_s = time.perf_counter() - start
        self.loaded_mib = [a - b for a, b in zip(resident_mib(), before, strict=True)]

    def __call__(self, ids):
        self.request.infer({"input_ids": ids})


def run_lookup_bench(
    workdir: Path,
    shapes: list[tuple[int, int]],
    repeat: int,
    warmup: int = 3,
    lookups: tuple[LookupShape, ...] = (DEMO, V41),
) -> list[str]:
    """Print the lookup tables; returns the target lines (met or MISSED)."""
    rng = np.random.default_rng(5)
    checks, table = [], []
    for lookup in lookups:
        calls = {}
        for form in lookup.forms:
            calls[form, "openvino"] = _Compiled(lookup, form, workdir, kernel=False)
            calls[form, "row kernel"] = _Compiled(lookup, form, workdir, kernel=True)
        for batch, tokens in shapes:
            rounds = [rng.integers(0, _VOCAB, (batch, tokens)) for _ in range(warmup + repeat)]
            medians = round_robin_ms(
                {
                    name: (lambda index, call=call, rounds=rounds: lambda: call(rounds[index]))
                    for name, call in calls.items()
                },
                repeat,
                warmup,
            )
            floor = medians["f32", "openvino"]
            for form in lookup.forms:
                ours, theirs = medians[form, "row kernel"], medians[form, "openvino"]
                table.append(
                    [
                        lookup.name,
                        f"{batch}x{tokens}",
                        form,
                        f"{theirs:.2f}",
                        f"{ours:.2f}",
                        f"{theirs / ours:.2f}x",
                        f"{ours / floor:.2f}",
                    ]
                )
                if form in ("u8", "u4", "fp8"):
                    checks.append(
                        target_line(
                            f"{lookup.name} {batch}x{tokens}: {form} row kernel / f32 Gather floor <= 1",
                            ours / floor,
                            1,
                        )
                    )
        del calls
    print(
        f"\nlookup alone, f32 out, median of {repeat} calls, fresh ids each call (ms); floor: OpenVINO's "
        "Gather on a resident f32 table of the same rows:"
    )
    print(
        format_table(
            table, ["table shape", "BxT", "stored", "openvino", "row kernel", "kernel speed-up", "kernel / floor"]
        )
    )
    memory_rows, shape = [], next(lookup for lookup in lookups if "u8" in lookup.forms)
    for table_memory in ("mmap", "populate", "hugepages"):
        _, file = resident_mib()
        compiled = _Compiled(shape, "u8", workdir, kernel=True, table_memory=table_memory, resident=False)
        first = []
        for _ in range(5):
            ids = rng.integers(0, _VOCAB, (50, 14))
            start = time.perf_counter()
            compiled(ids)
            first.append((time.perf_counter() - start) * 1e3)
        ran = resident_mib()
        memory_rows.append(
            [
                table_memory,
                f"{compiled.load_s:.2f}",
                f"{compiled.loaded_mib[0]:+.0f}",
                f"{compiled.loaded_mib[1]:+.0f}",
                f"{first[0]:.2f}",
                f"{statistics.median(first[1:]):.2f}",
                f"{ran[1] - file:+.0f}",
            ]
        )
        del compiled
    print(
        f"\ntable_memory, {shape.name} u8 table ({shape.table_rows * (shape.row_size + 3) / 2**20:.0f} MiB with "
        "scales and zero points), a fresh mapping of a file in the page cache; B=50, T=14:"
    )
    print(
        format_table(
            memory_rows,
            ["table_memory", "load s", "private MiB", "file MiB", "1st call ms", "calls 2-5 ms", "file MiB after"],
        )
    )
    return checks


def print_targets(checks: list[str]) -> None:
    if checks:
        print("\nlookup targets (ratios from this run):", *checks, sep="\n")
