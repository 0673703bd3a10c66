"""``engram-export bench --tiered --text FILE [...]``: DeepSeek-V4.1 tables in tiers, on real text.

The text is tokenized by the given tokenizer (the V4.1 preset takes its compression from it); the first
80% of the tokens calibrate, the rest is served.

1. Hit rates on the released layout (384M rows a layer, counted, no table needed): per layer and n-gram
   order, the share of the held-out lookups that the hot set serves at budgets of 0.1%, 1% and 10% of
   the table rows and at every row the calibration text reached, beside the oracle (the best set of the
   same size, chosen on the held-out text itself); then the hit rate against the amount of calibration
   text (10%, 50%, 100% of it).
2. Serving a dense table on disk (``--table-rows`` a layer, V4.1 rows: 256 FP8 codes + 8 E8M0 scales),
   written once into the work folder and kept between runs; before every round of a cold mode the table
   is evicted from the page cache (``posix_fadvise(DONTNEED)``), so every miss is a disk read: decode
   (B = 1 and 8, token by token through decode sessions) and prefill (B = 50, T = 14) with the table
   resident (``populate``), ``mmap`` cold, ``tiered`` without prefetch, and ``tiered`` with the prefetch
   issued before a backbone stand-in (a sleep: a GPU backbone leaves the CPU free) of one decode step
   or one prefill chunk. Reported: tokens/s against resident, per-call p50/p99 of the Engram work on the
   critical path, the read wait left after the prefetch, rows and bytes read, resident memory.
3. How to read a call's misses from a cold file: one after another, the tier's two ways (``miss_reads``:
   the kernel's readahead of every miss at once, or a pool of threads), and a cached row read without
   the queue.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from engram_export.core import progress
from engram_export.core.resources import available_memory
from engram_export.core.text import read_text, token_stream, windows
from engram_export.folders.calibration import all_orders, calibrate, choose_hot_rows, hit_rate, row_counts
from engram_export.folders.pipeline import compile_folder, export_checkpoint
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.verify import format_table
from engram_export.models.compression import build_compression_table
from engram_export.models.config import load_config
from engram_export.models.deepseek_v41 import V41Config, V41Hashing, head_primes
from engram_export.openvino.tiered import MISS_READS
from engram_export.runtime import EngramRuntime

__all__ = ["run_tiered_bench", "v41_with_tokenizer", "hit_rate_tables", "read_strategies"]

BUDGETS = (0.001, 0.01, 0.1)
ROW_BYTES = 264  # a V4.1 row: 256 FP8 codes and 8 E8M0 scales
CALIBRATE_SPEED_BUDGET = "0.01%"  # the hot set calibrate's speed is timed with: little to pack
RESIDENT_ROWS = 8_000_000  # rows a layer of the resident baseline's table when the served one cannot be resident
DECODE_BACKBONE_S = 0.015  # one decode step of a GPU backbone
PREFILL_BACKBONE_S = 0.030  # one prefill chunk of 50 x 14 tokens


def v41_with_tokenizer(tokenizer: Path, rows_per_layer: int | None = None) -> V41Config:
    """The deepseek-v41 preset with ``tokenizer``'s compression; tables of about ``rows_per_layer`` rows
    (default: the released 384M)."""
    lut = build_compression_table(str(tokenizer))
    config = dataclasses.replace(
        load_config("deepseek-v41"),
        tokenizer=str(tokenizer),
        vocab_size=len(lut),
        compressed_vocab_size=int(lut.max()) + 1,
    )
    if rows_per_layer is None:
        return config
    # the served model: the released row shape, a narrow backbone (hidden 512, not 5120) so that the fuse
    # stage's projection does not drown the table's costs on a 2-core machine
    config = dataclasses.replace(config, hidden_size=512)
    vocab = max(rows_per_layer // config.num_heads, config.compressed_vocab_size + 1)
    primes = head_primes(vocab, config.max_ngram_size, config.n_head_per_ngram, len(config.layer_ids))
    return dataclasses.replace(config, engram_vocab_size=vocab, num_embeddings=tuple(sum(p) for p in primes))


def _per_order(config, stream: np.ndarray) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    hashing = V41Hashing(config)
    return {layer: row_counts(hashing, config, layer, stream) for layer in config.layer_ids}


def _oracle(held_out: dict, size: int) -> dict[int, np.ndarray]:
    """The ``size`` rows (across layers) with the most held-out lookups."""
    merged = {layer: all_orders(orders) for layer, orders in held_out.items()}
    return choose_hot_rows(merged, dict.fromkeys(merged, 1), size)


def hit_rate_tables(config: V41Config, calibration_stream: np.ndarray, held_out_stream: np.ndarray) -> str:
    stream = np.concatenate([calibration_stream, held_out_stream])
    cut = len(calibration_stream)
    with progress.stage(f"counting lookups of {len(stream):,} tokens on the released layout"):
        calibration, held_out = _per_order(config, stream[:cut]), _per_order(config, stream[cut:])
    total_rows = sum(config.num_embeddings)
    reached = {layer: all_orders(orders) for layer, orders in calibration.items()}
    every = sum(len(rows) for rows, _ in reached.values())
    budgets = [(f"{share:.1%} of rows", int(share * total_rows)) for share in BUDGETS]
    budgets.append((f"every row reached ({every / total_rows:.2%})", every))
    orders = sorted(next(iter(calibration.values())))
    headers = ["hot budget", "rows"] + [f"L{layer} {order}-gram" for layer in config.layer_ids for order in orders]
    lines = []
    for name, size in budgets:
        hot = choose_hot_rows(reached, dict.fromkeys(reached, 1), size)
        oracle = _oracle(held_out, sum(len(rows) for rows in hot.values()))
        cells = [
            f"{hit_rate(hot[layer], *lookups):.0%} ({hit_rate(oracle[layer], *lookups):.0%})"
            for layer in config.layer_ids
            for lookups in (held_out[layer][order] for order in orders)
        ]
        lines.append([name, f"{sum(len(r) for r in hot.values()):,}", *cells])
    table = format_table(lines, headers)
    amount_lines = []
    for share in (0.1, 0.5, 1.0):
        part = _per_order(config, stream[: int(cut * share)]) if share < 1 else calibration
        seen = {layer: all_orders(orders) for layer, orders in part.items()}
        one_percent = choose_hot_rows(seen, dict.fromkeys(seen, 1), int(0.01 * total_rows))
        amount_lines.append(
            [f"{share:.0%} ({int(cut * share):,} tokens)"]
            + [f"{hit_rate(seen[layer][0], *all_orders(held_out[layer])):.0%}" for layer in config.layer_ids]
            + [f"{hit_rate(one_percent[layer], *all_orders(held_out[layer])):.0%}" for layer in config.layer_ids]
        )
    amount = format_table(
        amount_lines,
        ["calibration text"]
        + [f"L{layer} every row reached" for layer in config.layer_ids]
        + [f"L{layer} 1% of rows" for layer in config.layer_ids],
    )
    return (
        f"held-out hit rate, released layout ({total_rows:,} rows in {len(config.layer_ids)} layers), "
        f"{cut:,} tokens calibrate, {len(stream) - cut:,} held out; in brackets the oracle of the same size:\n"
        f"{table}\n\nheld-out hit rate against the amount of calibration text:\n{amount}"
    )


def _dense_checkpoint(config: V41Config, folder: Path) -> Path:
    """A V4.1 checkpoint whose tables are written densely (random FP8 codes, no NaN; scales 2^-7..2^0),
    once: a folder that holds one is reused."""
    done = folder / "dense.json"
    record = {"num_embeddings": list(config.num_embeddings), "tokenizer": config.tokenizer}
    if done.is_file() and json.loads(done.read_text()) == record:
        return folder
    checkpoint = write_v41_checkpoint(
        folder, config.to_dict(), rows={layer: np.zeros(0, np.int64) for layer in config.layer_ids}
    )
    rng = np.random.default_rng(0)
    total = sum(config.num_embeddings) * ROW_BYTES
    with progress.steps("writing the dense tables", total, "GiB") as counter:
        for shard in sorted(checkpoint.glob("*.safetensors")):
            with open(shard, "r+b") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(length))
                for name, entry in header.items():
                    if not name.endswith(("embed.weight", "embed.scale")):
                        continue
                    start, end = (8 + length + offset for offset in entry["data_offsets"])
                    for at in range(start, end, 1 << 28):
                        size = min(1 << 28, end - at)
                        if name.endswith("embed.weight"):
                            data = rng.integers(0, 256, size, np.uint8)
                            data[(data & 0x7F) == 0x7F] ^= 1  # no NaN codes
                        else:
                            data = (120 + rng.integers(0, 8, size)).astype(np.uint8)
                        file.seek(at)
                        file.write(data.tobytes())
                        counter.advance(size)
    (checkpoint / "tokenizer.json").write_bytes(Path(str(config.tokenizer)).read_bytes())
    done.write_text(json.dumps(record))
    return checkpoint


def _evict(folder: Path) -> None:
    """Drop every file under ``folder`` from the page cache (pages a live mapping holds stay)."""
    gc.collect()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _resident_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclasses.dataclass
class _Mode:
    name: str
    table_memory: str
    folder: Path
    prefetch: bool
    cold: bool  # evict the table before every round


def _decode_round(runtime, ids, hidden, prefetch: bool, latencies: list) -> float:
    """One round of token-by-token decode of ``ids`` [B, S]; returns its wall time."""
    batch = ids.shape[0]
    session = runtime.session(batch)
    layers = list(runtime)
    session.prefill(ids[:, :1], {layer: hidden[:, :1] for layer in layers})
    start = time.perf_counter()
    for t in range(1, ids.shape[1]):
        step_ids = ids[:, t : t + 1]
        if prefetch:
            session.prefetch(step_ids)
        time.sleep(DECODE_BACKBONE_S)
        began = time.perf_counter()
        session.step(step_ids, {layer: hidden[:, :1] for layer in layers})
        latencies.append((time.perf_counter() - began) * 1e3)
    return time.perf_counter() - start


def _prefill_round(runtime, batches, hidden, prefetch: bool, latencies: list) -> float:
    start = time.perf_counter()
    for ids in batches:
        handle = runtime.prefetch(ids) if prefetch else None
        time.sleep(PREFILL_BACKBONE_S)
        began = time.perf_counter()
        for layer in runtime:
            if handle is None:
                runtime[layer](ids, hidden)
            else:
                runtime[layer].fuse(handle, hidden)
        latencies.append((time.perf_counter() - began) * 1e3)
    return time.perf_counter() - start


def _stats(runtime) -> dict:
    """The tiered tables' counters, summed over the layers; {} for another table_memory."""
    if runtime.options.table_memory != "tiered":
        return {}
    totals: dict = {}
    for layer in runtime:
        for key, value in runtime[layer].table_stats().items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _compiled(config: V41Config, folder: Path) -> Path:
    """``config``'s dense checkpoint, exported and compiled (f32) under ``folder``, made once."""
    checkpoint = _dense_checkpoint(config, folder / "checkpoint")
    compiled, made_from = folder / "compiled", folder / "compiled_from.json"
    record = (folder / "checkpoint" / "dense.json").read_text()
    if not (compiled / "manifest.json").is_file() or not made_from.is_file() or made_from.read_text() != record:
        for stale in (compiled, folder / "onnx"):
            shutil.rmtree(stale, ignore_errors=True)
        compile_folder(export_checkpoint(checkpoint, folder / "onnx"), compiled, "f32")
        made_from.write_text(record)
    return compiled


def serving_table(
    config: V41Config, calibration: Path, held_out: np.ndarray, workdir: Path, steps: int, rounds: int
) -> str:
    """The serving table (see the module). A table larger than the memory available cannot be resident:
    the resident row then serves a table of ``RESIDENT_ROWS`` rows a layer (a resident lookup's cost does
    not depend on the table's size), said in the table's title."""
    compiled = _compiled(config, workdir)
    table_bytes = sum(config.num_embeddings) * ROW_BYTES
    resident_folder, resident_note = compiled, ""
    if table_bytes > available_memory() * 0.8:
        small = v41_with_tokenizer(Path(str(config.tokenizer)), RESIDENT_ROWS)
        resident_folder = _compiled(small, workdir / "resident")
        resident_note = (
            f"; the table ({table_bytes / 2**30:.1f} GiB) is larger than the memory available "
            f"({available_memory() / 2**30:.1f} GiB): the resident row serves a "
            f"{sum(small.num_embeddings) * ROW_BYTES / 2**30:.1f} GiB table of the same row shape"
        )
    tiered = workdir / "tiered"
    shutil.rmtree(tiered, ignore_errors=True)
    report = calibrate(compiled, tiered, [calibration], "1%")
    reached = sum(entry["rows_reached"] for entry in report["layers"].values())
    hot = sum(entry["hot_rows"] for entry in report["layers"].values())
    shapes = {"decode B=1": (1, steps), "decode B=8": (8, steps), "prefill 50x14": (50, 14)}
    modes = [
        _Mode("resident (populate)", "populate", resident_folder, True, False),
        _Mode("mmap cold", "mmap", compiled, True, True),
        _Mode("tiered, no prefetch", "tiered", tiered, False, True),
        _Mode("tiered + prefetch", "tiered", tiered, True, True),
    ]
    rng = np.random.default_rng(1)
    rows: list[list[str]] = []
    base: dict[str, float] = {}
    for name, (batch, length) in shapes.items():
        decode = name.startswith("decode")
        hidden = rng.standard_normal((batch, 1 if decode else length, config.hc_mult, config.hidden_size))
        hidden = hidden.astype(np.float32)
        for mode in modes:
            latencies: list[float] = []
            seconds, tokens, runtime, start_rss, load_s = 0.0, 0, None, _resident_mib(), 0.0
            for round_ in range(rounds):  # a fresh runtime each round in every mode: none runs warmer
                runtime = None
                if mode.cold:
                    _evict(mode.folder)
                began = time.perf_counter()
                runtime = EngramRuntime(mode.folder, table_memory=mode.table_memory)
                load_s = time.perf_counter() - began
                offset = round_ * 7919
                if decode:
                    ids = windows(held_out[offset:], length, batch)
                    seconds += _decode_round(runtime, ids, hidden, mode.prefetch, latencies)
                    tokens += batch * (length - 1)
                else:
                    batches = [windows(held_out[offset + k * 997 :], length, batch) for k in range(4)]
                    seconds += _prefill_round(runtime, batches, hidden, mode.prefetch, latencies)
                    tokens += 4 * batch * length
            stats, resident = _stats(runtime), _resident_mib() - start_rss
            runtime = None
            gc.collect()
            per_s = tokens / seconds
            base.setdefault(name, per_s)
            counted = bool(stats)
            rows.append(
                [
                    name,
                    mode.name,
                    f"{per_s:,.0f}",
                    f"{per_s / base[name]:.3f}",
                    f"{np.percentile(latencies, 50):.2f}",
                    f"{np.percentile(latencies, 99):.2f}",
                    f"{stats['hot_hits'] / max(1, stats['lookups']):.0%}" if counted else "-",
                    f"{stats['rows_read']:,}" if counted else "-",
                    f"{stats['bytes_read'] / 2**20:.1f}" if counted else "-",
                    f"{stats['read_wait_ms']:.1f}" if counted else "-",
                    f"{stats['prefetch_wait_ms']:.1f}" if counted else "-",
                    f"{load_s:.2f}",
                    f"{resident:,.0f}",
                ]
            )
    headers = ["workload", "table", "tokens/s", "vs resident", "p50 ms", "p99 ms", "hot hits", "rows read"]
    headers += ["MiB read", "read wait ms", "call wait ms", "load s", "RSS growth MiB"]
    table = format_table(rows, headers)
    size = sum(config.num_embeddings) * ROW_BYTES / 2**30
    hot_mib = hot * ROW_BYTES / 2**20
    return (
        f"serving {size:.1f} GiB of tables ({', '.join(f'{r:,}' for r in config.num_embeddings)} rows), evicted "
        f"from the page cache before every round of the cold modes; {rounds} rounds, a fresh runtime each; hot set "
        f"{hot:,} rows, {hot_mib:.0f} MiB (1% of the table rows, {hot / max(1, reached):.1%} of the {reached:,} "
        f"rows the calibration text reached); backbone stand-in {DECODE_BACKBONE_S * 1e3:.0f} ms a decode step, "
        f"{PREFILL_BACKBONE_S * 1e3:.0f} ms a prefill chunk; p50/p99: the Engram call on the critical path "
        f"(step, or fuse after the prefetch); counters of the last round: read wait = time the kernel waited "
        f"for queued reads, call wait = time the calls still waited for their prefetched lookups; RSS growth: "
        f"resident memory after the mode's last round minus before its first load{resident_note}\n{table}"
    )


def read_strategies(table: Path, tiered: Path, held_out: np.ndarray, count: int = 4096, rounds: int = 3) -> str:
    """How to read scattered rows of a cold table file at once (medians of ``rounds``, the files evicted
    before each): one pread after another (what a page fault costs, in turn), the tier's two ways
    (``miss_reads``) on the misses of a 50x14 lookup, and a cached row read without the queue."""
    size = table.stat().st_size
    rng = np.random.default_rng(3)
    fd = os.open(table, os.O_RDONLY)
    lines = []
    try:
        times = []
        for _ in range(rounds):
            offsets = (rng.integers(0, size // 256 - 1, count) * 256).tolist()
            _evict(table.parent)
            start = time.perf_counter()
            for offset in offsets:
                os.pread(fd, 256, offset)
            times.append(time.perf_counter() - start)
        per_row = float(np.median(times)) / count * 1e6
        lines.append([f"one pread after another ({count:,} rows)", f"{np.median(times) * 1e3:.1f}", f"{per_row:.1f}"])
        start = time.perf_counter()
        for offset in offsets:  # read above: in the page cache now
            os.preadv(fd, [bytearray(256)], offset, os.RWF_NOWAIT)
        per_row = (time.perf_counter() - start) / count * 1e6
        lines.append(["a cached row, preadv2(RWF_NOWAIT) in the caller", "-", f"{per_row:.1f}"])
    finally:
        os.close(fd)
    for miss_reads in MISS_READS:
        times, queued = [], 0
        for round_ in range(rounds):
            _evict(tiered)
            runtime = EngramRuntime(tiered, table_memory="tiered", miss_reads=miss_reads)
            layer = runtime.layer_ids[0]
            ids = windows(held_out[round_ * 4999 :], 14, 50)
            start = time.perf_counter()
            runtime[layer].lookup(ids)
            times.append(time.perf_counter() - start)
            stats = runtime[layer].table_stats()
            queued = stats["queued_rows"]
            wait_ms = stats["read_wait_ms"]
            del runtime
        lines.append(
            [
                f"the tier, miss_reads={miss_reads!r}: a 50x14 lookup, {queued:,} rows from disk",
                f"{np.median(times) * 1e3:.1f}",
                f"{wait_ms * 1e3 / max(1, queued):.1f}",
            ]
        )
    return f"reading scattered rows of a cold {size / 2**30:.1f} GiB table file:\n" + format_table(
        lines, ["how", "ms", "us a row read"]
    )


def _shuffled_text(texts: list[Path], path: Path, mib: int) -> Path:
    """``mib`` MiB of the words of ``texts`` in shuffled order, paragraphs of 100 words (written once)."""
    if path.is_file() and path.stat().st_size >= mib << 20:
        return path
    words = np.array(" ".join(read_text(text) for text in texts).split(), dtype=object)
    rng, written = np.random.default_rng(2), 0
    with open(path, "w", encoding="utf-8") as file:
        while written < mib << 20:
            shuffled = words[rng.permutation(len(words))]
            text = "\n\n".join(" ".join(shuffled[at : at + 100]) for at in range(0, len(shuffled), 100)) + "\n\n"
            file.write(text)
            written += len(text.encode())
    return path


def calibration_speed(compiled: Path, texts: list[Path], workdir: Path, mib: int) -> str:
    """``calibrate`` on ``mib`` MiB of the text's words in shuffled order: every n-gram is new, so it
    reaches the most distinct rows a text of that size can (the worst case for counting's time and memory)."""
    text = _shuffled_text(texts, workdir / f"shuffled_{mib}MiB.txt", mib)
    output = workdir / "calibration_speed"
    shutil.rmtree(output, ignore_errors=True)
    process, peak, done = psutil.Process(), [0], threading.Event()
    start_rss = process.memory_info().rss

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], process.memory_info().rss - start_rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    report = calibrate(compiled, output, [text], CALIBRATE_SPEED_BUDGET)
    seconds = time.perf_counter() - began
    done.set()
    watcher.join()
    shutil.rmtree(output, ignore_errors=True)
    size = text.stat().st_size
    tokens = report["text"]["tokens"]
    reached = sum(entry["rows_reached"] for entry in report["layers"].values())
    row = [
        f"{size / 2**20:,.0f}",
        f"{tokens:,}",
        f"{seconds:.1f}",
        f"{tokens / seconds:,.0f}",
        f"{size / 2**20 / seconds:.2f}",
        f"{seconds * 2**30 / size / 60:.1f}",
        f"{reached:,}",
        f"{peak[0] / 2**20:,.0f}",
    ]
    headers = ["text MiB", "tokens", "s", "tokens/s", "MiB/s", "min a GiB", "rows reached", "peak RSS growth MiB"]
    return (
        f"calibrate speed ({len(report['layers'])} layers, {os.cpu_count()} cores): the words of the text in "
        f"shuffled order, every n-gram new (the most rows a text of this size reaches); tokenize, hash, count, "
        f"choose and write a {CALIBRATE_SPEED_BUDGET} hot set (packing a larger one is reading the table)\n"
        f"{format_table([row], headers)}"
    )


def _split_text(texts: list[Path], workdir: Path) -> tuple[Path, Path]:
    """The texts cut at 80% of their characters (on a paragraph break): (calibration, held-out) files."""
    text = "\n\n".join(read_text(path) for path in texts)
    cut = text.rfind("\n\n", 0, int(len(text) * 0.8))
    cut = int(len(text) * 0.8) if cut < 0 else cut
    files = workdir / "calibration.txt", workdir / "held_out.txt"
    files[0].write_text(text[:cut])
    files[1].write_text(text[cut:])
    return files


def run_tiered_bench(
    texts: list[Path],
    tokenizer: Path,
    workdir: Path,
    rows_per_layer: int,
    calibrate_mib: int = 256,
    steps: int = 48,
    rounds: int = 3,
) -> None:
    """Print the tables (see the module) for ``texts``, tokenized by ``tokenizer``."""
    calibration, held_out = _split_text(texts, workdir)
    calibration_stream, held_out_stream = (token_stream(tokenizer, [path]) for path in (calibration, held_out))
    print(
        f"text: {', '.join(p.name for p in texts)}; {len(calibration_stream):,} tokens calibrate, "
        f"{len(held_out_stream):,} held out (the last 20% of the text)\n"
    )
    print(hit_rate_tables(v41_with_tokenizer(tokenizer), calibration_stream, held_out_stream))
    print()
    config = v41_with_tokenizer(tokenizer, rows_per_layer)
    print(serving_table(config, calibration, held_out_stream, workdir, steps, rounds))
    print()
    table = max((workdir / "checkpoint").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    print(read_strategies(table, workdir / "tiered", held_out_stream))
    if calibrate_mib:
        print()
        print(calibration_speed(workdir / "compiled", texts, workdir, calibrate_mib))
