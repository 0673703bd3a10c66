"""``engram-export bench ray --text FILE [...]``: DeepSeek-V4.1 tables served by shards on Ray
against the same tables in this process, on real text.

The model is the released row shape (256 FP8 codes + 8 E8M0 scales a row) with a narrow backbone (hidden
512) and ``--table-rows`` rows a layer, written densely once into the work folder; the shards and the
local runtime both hold their rows in memory (``populate``), so the difference is the trip to the
shards. The cluster is the one ``RAY_ADDRESS`` names, else a local one started here (127.0.0.1 only,
Ray's token authentication on). Reported, in one run:

0. the data path: a read of B tokens' rows from the shards through actor calls and Ray's compiled graph
   (``remote_paths.py``);
1. per call (p50 over the calls): the lookup alone and the whole layer call, local and remote, at B = 1
   and 8 (decode) and B = 50, T = 14 (prefill); bytes moved and requests per call;
2. decode at depth (``depth.py``: each Engram layer's rows needed when a backbone of the config's
   layers reaches it): rows for a GPU engine through the row API, local against Ray, for step times of
   5, 15 and 50 ms and B = 1, 8 and 64, each layer's exposed wait; then the CPU running the whole
   module at 15 ms a step: local, remote, and remote with the step's lookups prefetched when it begins;
3. calls/s from 1, 2 and 4 client threads, local and remote;
4. a replica's process killed in a stream of calls: with a second replica (failover) and without one
   (the calls wait for Ray to start it again).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np

from engram_export.core.text import token_stream, windows
from engram_export.measure.common import format_table, ray_cluster
from engram_export.measure.depth import BATCHES, STEP_TIMES_S, schedule_for
from engram_export.measure.depth import backbone_layers as depth_layers
from engram_export.measure.depth_rows import RowsMode, rows_depth_table
from engram_export.measure.remote_paths import remote_path_table
from engram_export.measure.v41_text import DECODE_STEP_S, compiled_v41, decode_round, v41_with_tokenizer
from engram_export.models.deepseek_v41_config import V41Hashing
from engram_export.runtime import EngramRuntime
from engram_export.runtime.rows import EngramRows
from engram_export.sharding.client import GRAPH_SWITCH

__all__ = ["run_sharded_bench"]

SHAPES = {"decode B=1": (1, 1), "decode B=8": (8, 1), "prefill 50x14": (50, 14)}


def _p50_ms(call, repeat: int) -> float:
    call()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return float(np.median(times) * 1e3)


def _per_call(local, remote, stream: np.ndarray, hidden_size: int, hc_mult: int, repeat: int) -> str:
    rows = []
    layer = next(iter(local))
    rng = np.random.default_rng(0)
    for name, (batch, tokens) in SHAPES.items():
        ids = windows(stream, tokens, batch)
        hidden = rng.standard_normal((batch, tokens, hc_mult, hidden_size)).astype(np.float32)
        before = remote[layer].table_stats()
        times = {
            f"{where} {what}": _p50_ms(call, repeat)
            for where, runtime in (("local", local), ("remote", remote))
            for what, call in (
                ("lookup", lambda r=runtime, i=ids: r[layer].lookup(i)),
                ("call", lambda r=runtime, i=ids, h=hidden: r[layer](i, h)),
            )
        }
        after = remote[layer].table_stats()
        calls = after["calls"] - before["calls"]
        rows.append(
            [
                name,
                *(f"{times[key]:.2f}" for key in ("local lookup", "remote lookup", "local call", "remote call")),
                f"{times['remote call'] / times['local call']:.2f}",
                f"{(after['bytes'] - before['bytes']) / calls / 1024:,.1f}",
                f"{(after['requests'] - before['requests']) / calls:.1f}",
            ]
        )
    headers = ["shape", "local lookup ms", "remote lookup ms", "local call ms", "remote call ms", "remote/local"]
    return format_table(rows, [*headers, "KiB moved a call", "requests a call"])


def _decode(local, remote, stream: np.ndarray, config, schedule, steps: int) -> str:
    """The CPU running the whole module at depth: local tables, remote, remote with the prefetch."""
    rows = []
    rng = np.random.default_rng(1)
    layers = sorted(config.layer_ids)
    for batch in (1, 8):
        ids = windows(stream, steps, batch)
        hidden = rng.standard_normal((batch, 1, config.hc_mult, config.hidden_size)).astype(np.float32)
        results = {}
        for name, runtime, prefetch in (
            ("local", local, True),
            ("remote", remote, False),
            ("remote + prefetch", remote, True),
        ):
            results[name] = decode_round(runtime, ids, hidden, prefetch, schedule)
        per_s = {name: measured.tokens / measured.seconds for name, measured in results.items()}
        rows.append(
            [
                f"B={batch}",
                *(f"{value:,.1f}" for value in per_s.values()),
                f"{per_s['remote + prefetch'] / per_s['local']:.3f}",
                *(results[name].wait_ms(layer) for name in ("local", "remote + prefetch") for layer in layers),
            ]
        )
    headers = ["decode", "local tok/s", "remote tok/s", "remote+prefetch tok/s", "vs local"]
    headers += [f"{name} layer {layer} wait p50 / p99 ms" for name in ("local", "remote+prefetch") for layer in layers]
    return format_table(rows, headers)


def _throughput(local, remote, stream: np.ndarray, config, seconds: float = 3.0) -> str:
    layer = next(iter(local))
    ids = windows(stream, 1, 8)
    hidden = np.random.default_rng(2).standard_normal((8, 1, config.hc_mult, config.hidden_size)).astype(np.float32)
    rows = []
    for threads in (1, 2, 4):
        rates = []
        for runtime in (local, remote):
            counts, stop = [0] * threads, time.monotonic() + seconds

            def work(index: int, runtime=runtime, counts=counts, stop=stop) -> None:
                while time.monotonic() < stop:
                    runtime[layer](ids, hidden)
                    counts[index] += 1

            workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            rates.append(sum(counts) / seconds)
        rows.append([threads, f"{rates[0]:,.0f}", f"{rates[1]:,.0f}", f"{rates[1] / rates[0]:.2f}"])
    return format_table(rows, ["client threads", "local calls/s", "remote calls/s", "remote/local"])


def _restart(ray, compiled: Path, stream: np.ndarray, config, shards: int) -> str:
    """A stream of B=8 calls from one thread; a replica's process killed a second in."""
    from engram_export.sharding.cluster import serve_tables, stop_tables
    from engram_export.sharding.names import NAMESPACE, replica_name

    layer = config.layer_ids[0]
    ids = windows(stream, 1, 8)
    hidden = np.random.default_rng(3).standard_normal((8, 1, config.hc_mult, config.hidden_size)).astype(np.float32)
    rows = []
    for replicas in (2, 1):
        name = f"bench-restart-{replicas}"
        serve_tables(compiled, name, shards, replicas, "populate")
        try:
            runtime = EngramRuntime(compiled, tables=f"ray://{name}", shard_deadline=60)
            victim = ray.get_actor(replica_name(name, 0, 0), namespace=NAMESPACE)
            pid = ray.get(victim.identity.remote())["pid"]
            latencies: list[float] = []
            killed_at: int | None = None
            began = time.monotonic()
            while time.monotonic() - began < 4.0:
                if killed_at is None and time.monotonic() - began > 1.0:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = len(latencies)
                start = time.perf_counter()
                runtime[layer](ids, hidden)
                latencies.append((time.perf_counter() - start) * 1e3)
            p50 = float(np.median(latencies[:killed_at]))
            slow = [ms for ms in latencies[killed_at:] if ms > 3 * p50]
            rows.append(
                [
                    replicas,
                    f"{p50:.2f}",
                    f"{max(latencies[killed_at:]):,.1f}",
                    len(slow),
                    f"{sum(slow):,.1f}",
                    runtime[layer].table_stats()["failovers"],
                    runtime[layer].table_stats()["hedges"],
                ]
            )
        finally:
            stop_tables(name)
    headers = [
        "replicas",
        "p50 ms before",
        "slowest call after ms",
        "calls > 3x p50",
        "their ms",
        "failovers",
        "hedges",
    ]
    return format_table(rows, headers)


def run_sharded_bench(
    texts: list[Path],
    tokenizer: Path,
    workdir: Path,
    rows_per_layer: int,
    shards: int,
    backbone_layers: int | None = None,
    steps: int = 48,
) -> None:
    """Print the tables (see the module)."""
    from engram_export.sharding.cluster import describe, serve_tables, stop_tables

    config = v41_with_tokenizer(tokenizer, rows_per_layer)
    compiled = compiled_v41(config, workdir)
    stream = token_stream(tokenizer, texts)
    ray, started = ray_cluster()
    try:
        layout = serve_tables(compiled, "bench", shards, 2, "populate")
        try:
            print(describe(layout))
            print(
                f"\ntext: {', '.join(p.name for p in texts)}, {len(stream):,} tokens; {os.cpu_count()} cores shared "
                f"by this process and {shards * 2} shard processes\n"
            )
            print(
                "\nthe data path: a read of B tokens' rows (24 a token) from the shards, actor calls and compiled graph"
            )
            print(remote_path_table(compiled, "bench"))
            local = EngramRuntime(compiled, table_memory="populate")
            remote = EngramRuntime(compiled, tables="ray://bench")
            print(_per_call(local, remote, stream, config.hidden_size, config.hc_mult, repeat=30))
            layers = depth_layers(config, backbone_layers)
            # one of each for every round: a client's compiled graph is built once (a shard runs up to 8);
            # the remote rows read through the graph, as the data path table's (the switch is read when
            # the client is made: this process's environment is left as it was)
            local_rows = EngramRows(compiled, table_memory="populate")
            with mock.patch.dict(os.environ, {GRAPH_SWITCH: "1"}):
                remote_rows = EngramRows(compiled, tables="ray://bench")
            modes = [
                RowsMode("local (populate)", lambda: local_rows),
                RowsMode(f"Ray, {shards} shards", lambda: remote_rows),
            ]
            print(
                f"\nrows for a GPU engine at depth: Engram layers {', '.join(map(str, sorted(config.layer_ids)))} of a "
                f"{layers}-layer backbone, each step's reads issued when it begins (row API start, packed rows) and "
                f"each layer's rows waited for when the backbone reaches it; {steps} steps, 2 rounds; 'vs first': "
                f"tokens/s against the local tables"
            )
            print(rows_depth_table(V41Hashing(config), modes, stream, layers, STEP_TIMES_S, BATCHES, steps, 2))
            schedule = schedule_for(config, DECODE_STEP_S, layers)
            print(
                f"\nthe CPU running the whole module at depth ({DECODE_STEP_S * 1e3:g} ms a step, {layers} layers, "
                f"each Engram layer looked up (unless prefetched when the step began) and fused when the backbone "
                f"reaches it)"
            )
            print(_decode(local, remote, stream, config, schedule, steps))
            print("\nthroughput, decode-shaped calls (B=8, T=1) of one layer, no stand-in")
            print(_throughput(local, remote, stream, config))
        finally:
            stop_tables("bench")
        print("\na replica's process killed (SIGKILL) a second into a stream of B=8 calls of one layer")
        print(_restart(ray, compiled, stream, config, shards))
    finally:
        if started:
            ray.shutdown()
