"""The client side of sharded tables: a call's rows fetched from the shards that own them, in stored form.

``request`` sends each shard only the rows it owns, one request per shard, at once, and returns; the
``Pending`` it returns waits for the answers (``result``, through ``ShardedTables.collect``). A lookup
is idempotent: a replica that fails (its process died, its node is gone) is replaced by the next replica
and asked last for a while; one that has not answered after 100 ms is joined by the next (whichever
answers first); when every replica failed the call is sent again, after a short pause, while Ray
restarts them, until ``deadline`` seconds have passed; then a one-line ``EngramUnavailable`` names the
shard. A shard is trusted only once it said it serves the pieces and fingerprints of the layout (checked
again whenever its name resolves to a new actor); one that serves another table is an ``EngramError``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np

from engram_export.core.errors import EngramError, EngramUnavailable
from engram_export.openvino.tiered import RowLayout, packed_parts, row_parts
from engram_export.sharding.fast_path import FastPath
from engram_export.sharding.layout import ShardPlan
from engram_export.sharding.names import NAMESPACE, cause_of, replica_name

__all__ = ["ShardedTables", "Pending", "REMOTE_STATS"]

REMOTE_STATS = ("calls", "requests", "rows", "bytes", "failovers", "hedges", "fast_calls", "fast_failures")
GRAPH_SWITCH = "ENGRAM_EXPORT_RAY_GRAPH"  # "1": reads through the compiled graph (opt-in)
_PAUSE_S = 0.05  # between rounds of every replica failing (Ray restarts them meanwhile)
_HEDGE_S = 0.1  # a replica that has not answered by then is joined by the next one
_CHECK_S = 1.0  # the most a replica's identity check may take when its name resolves again
_SUSPECT_S = 2.0  # a replica that failed is asked last for this long
_FAST_S = 1.0  # the most a call waits on the compiled graph before it goes the actor-call way
_FAST_WAIT_S = 0.002  # the most a call waits for the graph while another thread's call runs on it
_REBUILD_S = (1.0, 60.0)  # a graph that failed is built again after this, doubling up to the second


class ShardedTables:
    """Rows of the tables served under ``layout['name']`` (``cluster.served_layout``), for the layers
    added with their stored layout (``add_layer``)."""

    def __init__(self, ray, layout: dict, deadline: float, fast_path: bool | None = None):
        """``fast_path``: fetch through a compiled graph (``fast_path.FastPath``) where it works; by
        default only where ``ENGRAM_EXPORT_RAY_GRAPH=1``. Off by default: in the full test suite Ray
        2.60's driver twice aborted on a failed check while serializing an actor handle for a graph
        ("Cannot find an actor handle of id"), not understood yet."""
        if fast_path is None:
            fast_path = os.environ.get(GRAPH_SWITCH) == "1"
        self.ray, self.name, self.deadline, self.fast_path = ray, layout["name"], deadline, fast_path
        self.replicas = layout["replicas"]
        self.plans = [ShardPlan.from_dict(shard) for shard in layout["shards"]]
        self._expected = {
            plan.index: {
                "name": self.name,
                "index": plan.index,
                "pieces": [piece.to_dict() for piece in plan.pieces],
                "identities": {str(p.layer): layout["identities"][str(p.layer)] for p in plan.pieces},
            }
            for plan in self.plans
        }
        self.layouts: dict[int, RowLayout] = {}
        # per layer: the first row, the end and the shard of each piece, in row order
        self._starts: dict[int, tuple[np.ndarray, ...]] = {}
        self._handles: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        self._turns: dict[int, int] = {}  # per shard: the replica its next request starts with
        self._suspect: dict[tuple[int, int], float] = {}  # (shard, replica) -> asked last until then
        self._stats: dict[int, dict] = {}
        self._fast: FastPath | None = None
        self._fast_lock = threading.Lock()  # one call at a time on the graph
        self._fast_state = {"building": False, "after": 0.0, "pause": _REBUILD_S[0]}
        self.fast_path_error: str | None = None  # why the compiled graph's last build failed

    def add_layer(self, layer: int, layout: RowLayout) -> None:
        """Serve layer ``layer``, stored as ``layout``: the shards' pieces must cover its rows exactly."""
        pieces = sorted((p.start, p.stop, plan.index) for plan in self.plans for p in plan.pieces if p.layer == layer)
        bounds = [0] + [stop for _, stop, _ in pieces]
        if not pieces or [start for start, _, _ in pieces] != bounds[:-1] or bounds[-1] != layout.table_rows:
            raise EngramError(
                f"the tables {self.name!r} do not cover layer {layer}'s {layout.table_rows:,} rows: refused"
            )
        self.layouts[layer] = layout
        self._starts[layer] = tuple(np.array(column, np.int64) for column in zip(*pieces, strict=True))
        self._stats[layer] = dict.fromkeys(REMOTE_STATS, 0)

    def check(self) -> None:
        """Every shard answers with the identity the layout gives it (one replica each suffices)."""
        for plan in self.plans:
            self._answer(plan.index, lambda handle: handle.identity.remote(), time.monotonic() + self.deadline)

    def request(self, layer: int, rows: np.ndarray) -> Pending:
        """Start fetching ``rows`` (sorted, unique, int64) of layer ``layer`` from their shards."""
        calls = [(shard, wanted, self._send(shard, layer, wanted)) for shard, wanted in self._split(layer, rows)]
        self._count(layer, len(calls), len(rows))
        return Pending(self, layer, len(rows), calls)

    def _split(self, layer: int, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard, its rows) of ``rows`` (sorted, unique, int64), in row order: slices at the pieces'
        first rows (``add_layer`` made sure the pieces cover the table's rows, in order, without gaps)."""
        starts, stops, shards = self._starts[layer]
        if len(rows) and (rows[0] < 0 or rows[-1] >= stops[-1]):
            raise EngramError(f"layer {layer}: rows outside every shard of {self.name!r}")  # the hash never makes them
        bounds = [*np.searchsorted(rows, starts).tolist(), len(rows)]
        return [
            (int(shards[index]), rows[first:last])
            for index, (first, last) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
            if last > first
        ]

    def _count(self, layer: int, requests: int, rows: int, fast: bool = False) -> None:
        with self._lock:
            stats = self._stats[layer]
            stats["calls"] += 1
            stats["requests"] += requests
            stats["rows"] += rows
            stats["fast_calls"] += fast

    def collect(self, pending: Pending) -> dict[str, np.ndarray]:
        """The stored bytes of the rows ``pending`` requested, in row order: part -> u8 array (codes
        [N, row bytes]); replicas that fail are replaced, for up to ``self.deadline`` seconds from now."""
        layer, deadline = pending.layer, time.monotonic() + self.deadline
        answers = []
        for shard, rows, first in pending.calls:
            call = lambda handle, rows=rows: handle.rows.remote(layer, rows)  # noqa: E731
            answers.append((len(rows), self._answer(shard, call, deadline, first, layer)))
        parts = _concatenate(answers, self.layouts[layer], pending.count)
        with self._lock:
            self._stats[layer]["bytes"] += sum(part.nbytes for part in parts.values())
        return parts

    def read(self, layer: int, ids: np.ndarray, out, reader, form: str, owned=None, e8m0: str = "spec") -> None:
        """The rows of ``ids`` (numpy, any shape, in the table's range or -1) of layer ``layer`` written
        into ``out`` in ``form`` by the row reader ``reader`` (``row_reader.RowReader`` of the layer's
        layout): each distinct row asked for once from the shards that own it, then read from the stored
        bytes that came back as from a local table. Ids outside ``owned`` and -1 give zero rows."""
        flat = ids.reshape(-1)
        start, stop = owned if owned is not None else (0, self.layouts[layer].table_rows)
        wanted = (flat >= max(start, 0)) & (flat < stop)
        unique, inverse = np.unique(flat[wanted].astype(np.int64, copy=False), return_inverse=True)
        local = np.full(flat.shape, -1, np.int64)
        local[wanted] = inverse
        if len(unique):
            parts = self._fast_read(layer, unique)
            if parts is None:
                parts = self.collect(self.request(layer, unique))
        else:
            parts = {name: np.zeros(0, np.uint8) for name in self.layouts[layer].part_sizes(0)}
        source = ([parts[name] for name in ("codes", "scales", "zero_points") if name in parts], len(unique))
        reader.read(local.reshape(ids.shape), out, form, None, e8m0, source=source)

    def _fast_read(self, layer: int, rows: np.ndarray) -> dict[str, np.ndarray] | None:
        """The stored bytes of ``rows`` through the compiled graph, or ``None`` where it cannot serve them
        now (not built yet, busy past ``_FAST_WAIT_S``, or failing: then torn down and built again later)."""
        path = self._fast
        if not self.fast_path or path is None:
            if self.fast_path:
                self._build_soon()
            return None
        split = self._split(layer, rows)
        requests: list = [None] * len(self.plans)
        for shard, wanted in split:
            if requests[shard] is not None:  # two pieces of a layer on one shard: one request each
                return None
            requests[shard] = np.concatenate(([layer], wanted)).tobytes()
        if not self._fast_lock.acquire(timeout=_FAST_WAIT_S):
            return None
        try:
            answers = path.read(requests, min(_FAST_S, self.deadline))
            answered = [(len(wanted), answers[shard]) for shard, wanted in split]
            parts = _unpacked(answered, self.layouts[layer], len(rows))
        except Exception:  # any failure: the actor-call way answers, with failover and the deadline
            self._fast_failed(path, layer)
            return None
        finally:
            self._fast_lock.release()
        self._count(layer, len(split), len(rows), fast=True)
        with self._lock:
            self._fast_state["pause"] = _REBUILD_S[0]
            self._stats[layer]["bytes"] += sum(part.nbytes for part in parts.values())
        return parts

    def _fast_failed(self, path: FastPath, layer: int) -> None:
        with self._lock:
            self._stats[layer]["fast_failures"] += 1
            if self._fast is path:
                self._fast = None
                state = self._fast_state
                state["after"] = time.monotonic() + state["pause"]
                state["pause"] = min(2 * state["pause"], _REBUILD_S[1])
        path.close_later()

    def _build_soon(self) -> None:
        """Build the compiled graph on a thread of its own, unless one is building or it failed lately."""
        with self._lock:
            state = self._fast_state
            if state["building"] or time.monotonic() < state["after"]:
                return
            state["building"] = True
        threading.Thread(target=self._build, name="engram-fast-path", daemon=True).start()

    def _build(self) -> None:
        """A graph over one replica of each shard, each resolved by name and checked first (``_handle``):
        never a kept handle, which may be of an actor since killed and made again under its name."""
        path, error = None, None
        try:
            if not self.ray.is_initialized():  # a call after shutdown would start Ray again in this process
                raise EngramUnavailable("Ray is shut down")
            chosen = [(plan.index, self._order(plan.index)[0]) for plan in self.plans]
            with self._lock:
                for key in chosen:
                    self._handles.pop(key, None)
            handles = [self._handle(shard, replica, _CHECK_S) for shard, replica in chosen]
            path = FastPath(self.ray, handles)
        except Exception as failure:  # a replica down, or refused: the actor-call way tells the caller
            error = f"{type(failure).__name__}: {failure}"
        with self._lock:
            state = self._fast_state
            state["building"], self.fast_path_error = False, error
            if path is None:
                state["after"] = time.monotonic() + state["pause"]
                state["pause"] = min(2 * state["pause"], _REBUILD_S[1])
            else:
                self._fast = path

    def close(self) -> None:
        """Tear the compiled graph down (it is built again at the next call)."""
        with self._lock:
            path, self._fast = self._fast, None
        if path is not None:
            with self._fast_lock:
                path.close()

    def stats(self, layer: int) -> dict:
        with self._lock:
            return dict(self._stats[layer])

    def _handle(self, shard: int, replica: int, timeout: float):
        """The replica's actor, checked against the layout the first time its name resolves to it."""
        key = (shard, replica)
        with self._lock:
            handle = self._handles.get(key)
        if handle is not None:
            return handle
        try:
            handle = self.ray.get_actor(replica_name(self.name, shard, replica), namespace=NAMESPACE)
        except ValueError as exc:
            raise _Down(f"replica {replica} is not running") from exc
        identity = self.ray.get(handle.identity.remote(), timeout=max(0.01, timeout))
        found = {key: identity.get(key) for key in self._expected[shard]}
        if found != self._expected[shard]:
            raise EngramError(
                f"{replica_name(self.name, shard, replica)} serves another table or rows than the layout of "
                f"{self.name!r} gives it (its fingerprints or pieces differ): refused"
            )
        with self._lock:
            self._handles[key] = handle
        return handle

    def _down(self, shard: int, replica: int, layer: int | None) -> None:
        """A replica failed: resolved again by name next time, and asked last for a while."""
        with self._lock:
            self._handles.pop((shard, replica), None)
            self._suspect[(shard, replica)] = time.monotonic() + _SUSPECT_S
            if layer is not None:
                self._stats[layer]["failovers"] += 1

    def _order(self, shard: int) -> list[int]:
        """The replicas of ``shard`` in the order to ask them: in turn, those that failed lately last."""
        now = time.monotonic()
        with self._lock:
            turn = self._turns[shard] = self._turns.get(shard, -1) + 1
            order = [(turn + step) % self.replicas for step in range(self.replicas)]
            return sorted(order, key=lambda replica: self._suspect.get((shard, replica), 0) > now)

    def _send(self, shard: int, layer: int, rows: np.ndarray):
        """(replica, reference) of the request, or (replica, the failure) where the replica is not there."""
        replica = self._order(shard)[0]
        try:
            return replica, self._handle(shard, replica, _CHECK_S).rows.remote(layer, rows)
        except EngramError:
            raise
        except Exception as exc:  # the replica is down: the answer fails over
            self._down(shard, replica, layer)
            return replica, exc

    def _answer(self, shard: int, call, deadline: float, first=None, layer: int | None = None):
        """The answer of ``call(handle)`` from some replica of ``shard``; ``first`` is (replica, reference
        or failure) of a call already sent. A replica that fails is replaced by the next; one that has
        not answered after ``_HEDGE_S`` is joined by the next (whichever answers first); when every replica
        failed, all are tried again after a pause, until ``deadline``."""
        outstanding: list[tuple[int, object]] = []
        tried: set[int] = set()
        failure: BaseException | None = None

        def send(replica: int) -> None:
            nonlocal failure
            tried.add(replica)
            try:
                handle = self._handle(shard, replica, min(_CHECK_S, deadline - time.monotonic()))
                outstanding.append((replica, call(handle)))
            except EngramError:
                raise
            except Exception as exc:  # not there, or not answering: the next one
                failure = exc
                self._down(shard, replica, layer)

        if first is not None:
            replica, sent = first
            tried.add(replica)
            if isinstance(sent, BaseException):
                failure = sent
            else:
                outstanding.append((replica, sent))
        while True:
            remaining = deadline - time.monotonic()
            untried = [replica for replica in self._order(shard) if replica not in tried]
            if not outstanding:
                if untried:
                    send(untried[0])
                    continue
                if remaining <= 0:
                    raise EngramUnavailable(
                        f"{self._shard_name(shard)} is down: no replica answered within {self.deadline:g} s "
                        f"(last: {cause_of(failure)})"
                    )
                time.sleep(min(_PAUSE_S, remaining))
                tried.clear()
                continue
            if remaining <= 0:
                raise EngramUnavailable(f"{self._shard_name(shard)} did not answer within {self.deadline:g} s")
            references = [reference for _, reference in outstanding]
            ready, _ = self.ray.wait(
                references, num_returns=1, timeout=min(remaining, _HEDGE_S) if untried else remaining
            )
            if not ready:
                if untried:
                    send(untried[0])  # a second replica for this call: whichever answers first
                    if layer is not None:
                        with self._lock:
                            self._stats[layer]["hedges"] += 1
                continue
            index = references.index(ready[0])
            replica, reference = outstanding.pop(index)
            try:
                return self.ray.get(reference)
            except self.ray.exceptions.RayTaskError as exc:  # the shard refused the call: no retry helps
                raise EngramError(f"{self._shard_name(shard)} refused the call: {cause_of(exc)}") from exc
            except Exception as exc:  # the replica died or is restarting
                failure = exc
                self._down(shard, replica, layer)

    def _shard_name(self, shard: int) -> str:
        plan = self.plans[shard]
        pieces = ", ".join(f"layer {p.layer} rows {p.start:,}..{p.stop - 1:,}" for p in plan.pieces)
        return f"shard {shard} of tables {self.name!r} ({pieces})"


class _Down(Exception):
    """A replica that is not there (its name resolves to no actor)."""


@dataclasses.dataclass
class Pending:
    """The requests of one call in flight (``ShardedTables.request``); ``result`` waits for them."""

    tables: ShardedTables
    layer: int
    count: int  # rows requested
    calls: list  # (shard, rows, (replica, reference or failure))

    def result(self) -> dict[str, np.ndarray]:
        """The stored bytes of the requested rows, in row order: part -> u8 array (codes [N, row bytes])."""
        return self.tables.collect(self)


def _concatenate(answers: list[tuple[int, dict]], layout: RowLayout, count: int) -> dict[str, np.ndarray]:
    """The shards' packed parts as one packing of all their rows, in order."""
    per_row = [row_parts(answer, layout, rows) for rows, answer in answers]
    parts = packed_parts({part: np.concatenate([p[part] for p in per_row]) for part in per_row[0]}, layout)
    for part, size in layout.part_sizes(count).items():
        if parts[part].nbytes != size:
            raise EngramError(
                f"the shards answered {parts[part].nbytes} bytes of {part} for {count} rows, expected {size}"
            )
    return parts


def _unpacked(answers: list[tuple[int, bytes]], layout: RowLayout, count: int) -> dict[str, np.ndarray]:
    """The shards' answers to the compiled graph (``TableShard.serve``: rows in the reader's packed form,
    codes, scales, zero points a byte a group) as the parts a row reader reads (``pack_hot_rows``' form):
    each answer's columns copied once into the parts, no concatenation."""
    groups = layout.zero_bits // layout.zero_value_bits if layout.zero_bits else 0
    sizes = {"codes": layout.row_bytes, "scales": layout.scale_bytes, "zero_points": groups}
    width = sum(sizes.values())
    parts = {name: np.empty((count, size), np.uint8) for name, size in sizes.items() if size}
    row = 0
    for rows, answer in answers:
        if len(answer) != rows * width:
            raise EngramError(f"a shard answered {len(answer)} bytes for {rows} rows of {width} bytes")
        packed, column = np.frombuffer(answer, np.uint8).reshape(rows, width), 0
        for name, part in parts.items():
            part[row : row + rows] = packed[:, column : column + sizes[name]]
            column += sizes[name]
        row += rows
    if row != count:
        raise EngramError(f"the shards answered {row} rows, expected {count}")
    return packed_parts(parts, layout)
