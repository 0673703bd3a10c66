"""``bench tiered``'s serving table: a dense DeepSeek-V4.1 table on disk served in every way a runtime
can hold it, the CPU running the whole module beside a GPU backbone, decode and prefill from real text.

The table (``--table-rows`` a layer, V4.1 rows: 256 FP8 codes + 8 E8M0 scales) is written once into the
work folder and kept between runs; before every round of a cold mode it is evicted from the page cache
(``posix_fadvise(DONTNEED)``), so every miss is a disk read. Decode (B = 1 and 8, token by token through
decode sessions) and prefill (B = 50, T = 14) run with the table resident (``populate``), ``mmap`` cold,
``tiered`` without prefetch, and ``tiered`` with the step's lookups prefetched when it begins; each
Engram layer is fused when the backbone reaches it (``depth.py``). Reported: tokens/s against resident,
each Engram layer's exposed wait (p50/p99), the read wait left after the prefetch, rows and bytes read,
resident memory.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import numpy as np
import psutil

from engram_export.core.resources import available_memory
from engram_export.core.text import windows
from engram_export.folders.manifest import read_manifest
from engram_export.measure.common import evict_page_cache, format_table
from engram_export.measure.depth import DepthRound, DepthSchedule, run_round, schedule_for
from engram_export.measure.v41_text import (
    DECODE_STEP_S,
    PREFILL_STEP_S,
    ROW_BYTES,
    compiled_v41,
    decode_round,
    v41_with_tokenizer,
)
from engram_export.models.deepseek_v41_config import V41Config
from engram_export.runtime import EngramRuntime

__all__ = ["serving_table", "RESIDENT_ROWS"]

RESIDENT_ROWS = 8_000_000  # rows a layer of the resident baseline's table when the served one cannot be resident


def _resident_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclasses.dataclass
class _Mode:
    name: str
    table_memory: str
    folder: Path
    prefetch: bool
    cold: bool  # evict the table before every round


def _prefill_round(runtime, batches, hidden, prefetch: bool, schedule: DepthSchedule) -> DepthRound:
    """Prefill chunks one after another on ``schedule`` (a chunk a step): each chunk's lookups prefetched
    when it begins if ``prefetch``, each Engram layer looked up (if not) and fused when the backbone
    reaches it."""

    def issue(k: int):
        return (batches[k], runtime.prefetch(batches[k]) if prefetch else None)

    def fuse(handle, layer: int) -> None:
        ids, prefetched = handle
        if prefetched is None:
            runtime[layer](ids, hidden)
        else:
            runtime[layer].fuse(prefetched, hidden)

    return run_round(schedule, len(batches), batches[0].size, issue, fuse)


def _stats(runtime) -> dict:
    """The tiered tables' counters, summed over the layers; {} for another table_memory."""
    if runtime.options.table_memory != "tiered":
        return {}
    totals: dict = {}
    for layer in runtime:
        for key, value in runtime[layer].table_stats().items():
            totals[key] = totals.get(key, 0) + value
    return totals


def serving_table(
    config: V41Config, tiered: Path, held_out: np.ndarray, workdir: Path, backbone_layers: int, steps: int, rounds: int
) -> str:
    """The serving table (see the module). A table larger than the memory available cannot be resident:
    the resident row then serves a table of ``RESIDENT_ROWS`` rows a layer (a resident lookup's cost does
    not depend on the table's size), said in the table's title."""
    compiled = compiled_v41(config, workdir)
    table_bytes = sum(config.num_embeddings) * ROW_BYTES
    resident_folder, resident_note = compiled, ""
    if table_bytes > available_memory() * 0.8:
        small = v41_with_tokenizer(Path(str(config.tokenizer)), RESIDENT_ROWS)
        resident_folder = compiled_v41(small, workdir / "resident")
        resident_note = (
            f"; the table ({table_bytes / 2**30:.1f} GiB) is larger than the memory available "
            f"({available_memory() / 2**30:.1f} GiB): the resident row serves a "
            f"{sum(small.num_embeddings) * ROW_BYTES / 2**30:.1f} GiB table of the same row shape"
        )
    report = read_manifest(tiered).calibration or {"layers": {}}
    reached = sum(entry["rows_reached"] for entry in report["layers"].values())
    hot = sum(entry["hot_rows"] for entry in report["layers"].values())
    shapes = {"decode B=1": (1, steps), "decode B=8": (8, steps), "prefill 50x14": (50, 14)}
    modes = [
        _Mode("resident (populate)", "populate", resident_folder, True, False),
        _Mode("mmap cold", "mmap", compiled, True, True),
        _Mode("tiered, no prefetch", "tiered", tiered, False, True),
        _Mode("tiered + prefetch", "tiered", tiered, True, True),
    ]
    schedules = {
        "decode": schedule_for(config, DECODE_STEP_S, backbone_layers),
        "prefill": schedule_for(config, PREFILL_STEP_S, backbone_layers),
    }
    rng = np.random.default_rng(1)
    rows: list[list[str]] = []
    base: dict[str, float] = {}
    for name, (batch, length) in shapes.items():
        decode = name.startswith("decode")
        hidden = rng.standard_normal((batch, 1 if decode else length, config.hc_mult, config.hidden_size))
        hidden = hidden.astype(np.float32)
        for mode in modes:
            measured, runtime, start_rss, load_s = DepthRound({}), None, _resident_mib(), 0.0
            for round_ in range(rounds):  # a fresh runtime each round in every mode: none runs warmer
                runtime = None
                if mode.cold:
                    evict_page_cache(mode.folder)
                began = time.perf_counter()
                runtime = EngramRuntime(mode.folder, table_memory=mode.table_memory)
                load_s = time.perf_counter() - began
                offset = round_ * 7919
                if decode:
                    ids = windows(held_out[offset:], length, batch)
                    measured.merge(decode_round(runtime, ids, hidden, mode.prefetch, schedules["decode"]))
                else:
                    batches = [windows(held_out[offset + k * 997 :], length, batch) for k in range(4)]
                    measured.merge(_prefill_round(runtime, batches, hidden, mode.prefetch, schedules["prefill"]))
            stats, resident = _stats(runtime), _resident_mib() - start_rss
            runtime = None
            gc.collect()
            per_s = measured.tokens / measured.seconds
            base.setdefault(name, per_s)
            counted = bool(stats)
            rows.append(
                [
                    name,
                    mode.name,
                    f"{per_s:,.0f}",
                    f"{per_s / base[name]:.3f}",
                    *(measured.wait_ms(layer) for layer in sorted(config.layer_ids)),
                    f"{stats['hot_hits'] / max(1, stats['lookups']):.0%}" if counted else "-",
                    f"{stats['rows_read']:,}" if counted else "-",
                    f"{stats['bytes_read'] / 2**20:.1f}" if counted else "-",
                    f"{stats['read_wait_ms']:.1f}" if counted else "-",
                    f"{stats['prefetch_wait_ms']:.1f}" if counted else "-",
                    f"{load_s:.2f}",
                    f"{resident:,.0f}",
                ]
            )
    headers = ["workload", "table", "tokens/s", "vs resident"]
    headers += [f"layer {layer} wait p50 / p99 ms" for layer in sorted(config.layer_ids)]
    headers += ["hot hits", "rows read"]
    headers += ["MiB read", "read wait ms", "call wait ms", "load s", "RSS growth MiB"]
    table = format_table(rows, headers)
    size = sum(config.num_embeddings) * ROW_BYTES / 2**30
    hot_mib = hot * ROW_BYTES / 2**20
    return (
        f"serving {size:.1f} GiB of tables ({', '.join(f'{r:,}' for r in config.num_embeddings)} rows), evicted "
        f"from the page cache before every round of the cold modes; {rounds} rounds, a fresh runtime each; hot set "
        f"{hot:,} rows, {hot_mib:.0f} MiB ({hot / max(1, reached):.1%} of the {reached:,} rows the calibration text "
        f"reached), no cache; the CPU runs the whole module (lookup and fuse) beside a backbone of "
        f"{backbone_layers} layers, {DECODE_STEP_S * 1e3:.0f} ms a decode step, {PREFILL_STEP_S * 1e3:.0f} ms a "
        f"prefill chunk, each Engram layer fused when the backbone reaches it; wait: how long the backbone waited "
        f"at that layer (the lookup if not prefetched, and the fuse); counters of the last round: read wait = time "
        f"the kernel waited for queued reads, call wait = time the calls still waited for their prefetched "
        f"lookups; RSS growth: resident memory after the mode's last round minus before its first load"
        f"{resident_note}\n{table}"
    )
