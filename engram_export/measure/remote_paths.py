"""The two data paths to sharded tables side by side: Ray actor calls (a task per shard and call) and the
compiled graph (``sharding/fast_path.py``), on the rows of a DeepSeek-V4.1 decode step.

A read is what a runtime's remote lookup does for one layer: ``24 * B`` distinct rows (int64 ids in),
each shard asked for its own, the stored bytes (264 a V4.1 row) back in row order. Both paths are timed
round-robin in one run on the same shards, so that the load of the host is the same for both.
"""

from __future__ import annotations

import time

import numpy as np

from engram_export.measure.common import format_table

__all__ = ["remote_path_table"]

ROWS_A_TOKEN = 24  # a V4.1 layer's lookup columns: (orders 2..4) x 8 heads


def _clients(name: str, folder, address: str | None):
    """(actor-call client, compiled-graph client, a layer, its row reader) of the tables ``name``."""
    from engram_export.runtime.rows import EngramRows
    from engram_export.sharding.client import ShardedTables
    from engram_export.sharding.cluster import served_layout

    rows = EngramRows(folder, tables=f"ray://{name}", ray_address=address)
    layer = next(iter(rows))
    own = rows[layer]._remote  # the row API's own client, for its Ray, deadline and layout
    clients = []
    for fast_path in (False, True):
        client = ShardedTables(own.ray, served_layout(name, address), own.deadline, fast_path=fast_path)
        client.add_layer(layer, own.layouts[layer])
        client.check()
        clients.append(client)
    return clients[0], clients[1], layer, rows[layer]._reader


def remote_path_table(folder, name: str, batches=(1, 8, 64), reads: int = 300, address: str | None = None) -> str:
    """p50 and p99 µs of a B-token read (``24 * B`` distinct rows of the folder's first layer) from the
    tables served as ``name`` (``serve_tables(folder, name, ...)``, on the cluster this process is joined
    to or ``address``), through actor calls and through the compiled graph, and their ratio."""
    actor, fast, layer, reader = _clients(name, folder, address)
    try:
        deadline = time.monotonic() + 30
        while fast.stats(layer)["fast_calls"] == 0:  # the graph is built on a thread of its own
            if time.monotonic() > deadline:
                raise RuntimeError("the compiled graph was not built within 30 s")
            _read(fast, layer, reader, np.arange(ROWS_A_TOKEN))
            time.sleep(0.05)
        size = actor.layouts[layer].table_rows
        rng = np.random.default_rng(0)
        table = []
        for batch in batches:
            times: dict[str, list[float]] = {"actor calls": [], "compiled graph": []}
            for index in range(reads + 10):
                ids = rng.choice(size, ROWS_A_TOKEN * batch, replace=False)
                for path, tables in zip(times, (actor, fast), strict=True):
                    began = time.perf_counter()
                    _read(tables, layer, reader, ids)
                    if index >= 10:
                        times[path].append((time.perf_counter() - began) * 1e6)
            actor_us, fast_us = (np.percentile(times[path], [50, 99]) for path in times)
            table.append(
                [
                    f"B={batch}",
                    ROWS_A_TOKEN * batch,
                    *(f"{value:,.0f}" for value in (*actor_us, *fast_us)),
                    f"{actor_us[0] / fast_us[0]:.1f}",
                ]
            )
        failures = fast.stats(layer)["fast_failures"]
    finally:
        fast.close()
    headers = ["read", "rows", "actor p50 µs", "actor p99 µs", "graph p50 µs", "graph p99 µs", "actor/graph p50"]
    return format_table(table, headers) + f"\n(compiled graph failures that went the actor-call way: {failures})"


def _read(tables, layer: int, reader, ids: np.ndarray) -> np.ndarray:
    out = reader.new_out(ids.shape, "packed")
    tables.read(layer, ids, out, reader, "packed")
    return out
