"""The OpenVINO backend: a layer's two stages (lookup, fuse) compiled for a device, and pools of their
infer requests so that any number of threads may call one runtime at once."""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino

from engram_export.contract.inputs import fuse_feeds
from engram_export.core.errors import EngramError, one_line
from engram_export.core.integrity import FileChecks
from engram_export.openvino import row_kernel
from engram_export.openvino.compile import read_openvino
from engram_export.openvino.extension import openvino_core
from engram_export.openvino.file_guard import constant_addresses, guard_mappings
from engram_export.openvino.precision import say_emulated
from engram_export.openvino.row_reader import RowReader
from engram_export.openvino.stages import EMBEDDINGS, infer, split_stages, wait
from engram_export.openvino.table_store import TableStore
from engram_export.runtime.decode import decode_stages
from engram_export.runtime.options import RuntimeOptions
from engram_export.runtime.remote_lookup import RemoteLookups
from engram_export.sharding.client import ShardedTables

__all__ = ["OpenVINOBackend"]


class _RequestPool:
    """Idle infer requests of one compiled model.

    A compiled model may be shared by any number of threads, an infer request may not: every call
    takes a request of its own (a new one when none is idle) and gives it back when done.
    """

    def __init__(self, compiled):
        self.compiled = compiled
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def take(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.compiled.create_infer_request()

    def give_back(self, request) -> None:
        self._idle.put(request)


class OpenVINOBackend:
    """Two compiled stages (``stages.split_stages``): lookup, then fuse on its output tensor."""

    def __init__(
        self,
        path: Path,
        options: RuntimeOptions,
        checks: FileChecks | None = None,
        store: TableStore | None = None,
        remote: ShardedTables | None = None,
    ):
        model, self.info = read_openvino(path, checks)
        self.remote = remote  # tables served by shards (runtime/remote_lookup.py), or None
        self.path, self.device = path, options.device
        # a tiered table's store is made per layer by the runtime (it knows the layer's hot set)
        self.table_memory: str | TableStore = store or options.table_memory
        self.lookup_kernel = options.lookup_kernel
        # calls that finished a prefetched lookup, and the time they still waited for it (table_stats)
        self._prefetched_calls, self._prefetch_wait_ns, self._counts_lock = 0, 0, threading.Lock()
        # asked for (the option, else the file's own) and what the device runs: a CPU without bf16 kernels
        # runs f32, so both stages are built and compiled f32 there, and the layer reports it
        self.requested_precision = options.precision or self.info.precision
        self.precision = say_emulated(self.requested_precision, options.device, path.name)
        self.config: dict[str, object] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if options.threads:
            self.config["INFERENCE_NUM_THREADS"] = options.threads
        if self.info.quantization in ("int8-weights", "int4-weights"):
            # The CPU plugin quantizes the activations of a compressed-weight MatMul per group, 32 by
            # default; groups of 128 are faster for a small loss of accuracy (docs/performance.md).
            self.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 128
        self.config.update(options.ov_config or {})
        self._model = model.clone()  # for the decode stages, built on first use (shares the constants)
        if remote is None:
            lookup, fuse = self._compile(*split_stages(model, self.precision))
            self.lookups: _RequestPool | RemoteLookups = _RequestPool(lookup)
        else:
            self.lookups, fuse = self._compile_remote(*split_stages(model, self.precision))
        self.fuses = _RequestPool(fuse)
        # at most as many calls inside OpenVINO as it has streams: more would only queue inside the
        # plugin while their requests hold memory
        self._streams = threading.BoundedSemaphore(max(1, int(fuse.get_property("NUM_STREAMS"))))
        precision_hint = fuse.get_property("INFERENCE_PRECISION_HINT")
        group = fuse.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
        self.settings = {
            "precision": getattr(precision_hint, "get_type_name", lambda: precision_hint)(),
            "dynamic-quantization-group": group,
            "lookup": self._lookup_kind,
        }
        self._decode, self._decode_lock = None, threading.Lock()
        # the files mapped under the model's constants (table, weights), which must not change under it
        memory = self.table_memory
        mapped = memory.mapped_addresses() if isinstance(memory, TableStore) else []  # a shared hot set's pages
        self.file_guard = guard_mappings(
            constant_addresses(self._model) + mapped, owner=(self._model, self.table_memory)
        )

    def _compile(self, lookup, fuse):
        """Both stages compiled, the lookup's table read by the extension's row kernel where it knows
        the table's form (``row_kernel.install``). A lookup left on OpenVINO's Gather over an f32 table
        (a DeepSeek-V4.1 checkpoint that stores one) is compiled without the CPU plugin's scan of f32
        constants for subnormals, which reads the whole table at every load (docs/performance.md); the
        lookup only gathers and converts, so the flag changes no value it
        computes. compile_model sets flush-to-zero on the thread that calls it with that flag and leaves it
        set, so that compile runs on a thread of its own: the caller's arithmetic keeps its subnormals."""
        core = openvino_core()
        installed = self.lookup_kernel and row_kernel.install(lookup, self.table_memory)
        name = getattr(self.table_memory, "name", self.table_memory)
        if not installed and name == "tiered":
            raise EngramError(f"{self.path.name}: table_memory='tiered' needs a table the row kernel reads")
        self._lookup_kind = f"row kernel, table {name}" if installed else "openvino gather"
        try:
            if not any(
                op.get_friendly_name() == "engram_table" and op.get_element_type().get_type_name() == "f32"
                for op in lookup.get_ops()
            ):
                return (
                    core.compile_model(lookup, self.device, self.config),
                    core.compile_model(fuse, self.device, self.config),
                )
            with ThreadPoolExecutor(1) as apart:
                compiled = apart.submit(
                    core.compile_model, lookup, self.device, {**self.config, "CPU_DENORMALS_OPTIMIZATION": True}
                ).result()
            return compiled, core.compile_model(fuse, self.device, self.config)
        except RuntimeError as exc:
            raise EngramError(
                f"OpenVINO cannot compile {self.path.name} for device {self.device!r}: {one_line(exc)}"
            ) from exc

    def _compile_remote(self, lookup, fuse):
        """The lookups of rows the shards send, read by the row API's reader in the form the lookup
        stage ends in (``remote_lookup.py``), and the fuse stage, compiled."""
        table = row_kernel.stored_table(lookup)
        if table is None:
            raise EngramError(f"{self.path.name}: tables served by shards need a table the row kernel reads")
        self.remote.add_layer(self.info.layer_id, table.layout)
        self._lookup_kind = f"row kernel, tables ray://{self.remote.name}"
        output = lookup.output(0)
        form = "bf16" if output.get_element_type() == openvino.Type.bf16 else "f32"
        reader = RowReader(table.attributes, table.table_rows, None)
        lookups = RemoteLookups(
            self.info.layer_id,
            self.info.config,
            self.remote,
            reader,
            (form, output.get_partial_shape().rank.get_length() == 3),
        )
        try:
            return lookups, openvino_core().compile_model(fuse, self.device, self.config)
        except RuntimeError as exc:
            raise EngramError(
                f"OpenVINO cannot compile {self.path.name} for device {self.device!r}: {one_line(exc)}"
            ) from exc

    def decode_requests(self):
        """A (lookup, fuse) pair of requests of the stateful decode stages, compiled once."""
        with self._decode_lock:
            if self._decode is None:
                lookup, fuse = decode_stages(self._model.clone(), self.info, self.precision)
                if self.remote is None:
                    self._decode = self._compile(lookup, fuse)
                else:  # the history of ids is kept by the remote request
                    self._decode = (None, openvino_core().compile_model(fuse, self.device, self.config))
        if self.remote is not None:
            return self.lookups.new(stateful=True), self._decode[1].create_infer_request()
        return tuple(compiled.create_infer_request() for compiled in self._decode)

    def start_lookup(self, feeds: dict):
        """Start the lookup asynchronously (OpenVINO's threads, no GIL) on a request of its own. It
        reads ``feeds`` in place: they must not change until it is finished (``prefetch`` passes
        copies of its own)."""
        request = self.lookups.take()
        request.start_async(feeds, share_inputs=True)
        return request

    def finish(
        self, lookup, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None, prefetched: bool = False
    ) -> np.ndarray:
        """Wait for ``lookup`` (from ``start_lookup(feeds)``), run the fuse stage on its embeddings, and
        give the lookup request back. The fuse stage reads ``hidden`` in place and writes straight into
        ``out`` (a new array if None): no copy of either, as large as the layer's output. ``prefetched``:
        the lookup was started by a prefetch, and the time waited for it counts in ``table_stats``."""
        try:
            start = time.perf_counter_ns()
            wait(lookup)
            if prefetched:
                self.count_prefetch_wait(time.perf_counter_ns() - start)
            fuse = self.fuses.take()
            try:
                result = np.empty(hidden.shape, np.float32) if out is None else out
                fuse.set_tensor(EMBEDDINGS, lookup.get_output_tensor(0))
                fuse.set_output_tensor(0, openvino.Tensor(result, shared_memory=True))
                fuse.start_async({"hidden_states": hidden, **fuse_feeds(feeds)}, share_inputs=True)
                wait(fuse)
                return result
            finally:
                self.fuses.give_back(fuse)
        finally:
            self.lookups.give_back(lookup)

    def count_prefetch_wait(self, nanoseconds: int) -> None:
        """A call that finished a prefetched lookup waited this long for it (``table_stats``)."""
        with self._counts_lock:
            self._prefetch_wait_ns += nanoseconds
            self._prefetched_calls += 1

    def table_stats(self) -> dict:
        """The tiered table's counters (``tiered.STATS``, rows and bytes) or the remote tables' (calls,
        requests to shards, rows, bytes received, failovers), and the time calls waited for a prefetched
        lookup: what the prefetch did not hide."""
        with self._counts_lock:
            prefetched = {"prefetched_calls": self._prefetched_calls, "prefetch_wait_ms": self._prefetch_wait_ns / 1e6}
        if self.remote is not None:
            return {**self.remote.stats(self.info.layer_id), **prefetched}
        stats_of = getattr(self.table_memory, "stats", None)
        if stats_of is None:
            raise EngramError(
                "table_stats counts a tiered table's hits and reads, or remote tables' requests: load with "
                "table_memory='tiered' or tables='ray://NAME'"
            )
        stats = stats_of()
        return {**stats, "read_wait_ms": stats.pop("read_ns") / 1e6, **prefetched}

    def profile(self, feeds: dict, hidden: np.ndarray, rounds: int, warmup: int) -> list[dict]:
        """OpenVINO's per-node times of both stages, averaged over ``rounds`` calls after ``warmup``."""
        if self.remote is not None:
            raise EngramError("profile times the stages of a local table; this runtime's tables are served by shards")
        if self.fuses.compiled.get_property("PERF_COUNT") not in (True, "YES"):  # the CPU plugin says "NO"
            raise EngramError("profile needs per-node counters: load with ov_config={'PERF_COUNT': True}")
        assert isinstance(self.lookups, _RequestPool)  # refused above for remote tables
        lookup, fuse = self.lookups.take(), self.fuses.take()
        totals: collections.Counter = collections.Counter()
        try:
            for index in range(warmup + rounds):
                infer(lookup, feeds)
                fuse.set_tensor(EMBEDDINGS, lookup.get_output_tensor(0))
                infer(fuse, {"hidden_states": hidden, **fuse_feeds(feeds)})
                for stage, request in (("lookup", lookup), ("fuse", fuse)):
                    for info in request.get_profiling_info() if index >= warmup else ():
                        key = (stage, info.node_type, info.exec_type, info.node_name)
                        totals[key] += info.real_time.total_seconds() * 1e3 / rounds
        finally:
            self.lookups.give_back(lookup)
            self.fuses.give_back(fuse)
        return [
            {"stage": stage, "node": node, "kernel": kernel, "name": name, "ms": ms}
            for (stage, node, kernel, name), ms in totals.most_common()
        ]

    def lookup_rows(self, feeds: dict) -> np.ndarray:
        """The lookup stage alone: the embeddings the fuse stage receives, as float32."""
        request = self.start_lookup(feeds)
        try:
            wait(request)
            return _as_float32(request.get_output_tensor(0))
        finally:
            self.lookups.give_back(request)

    def __call__(self, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        with self._streams:
            return self.finish(self.start_lookup(feeds), feeds, hidden, out)


def _as_float32(tensor) -> np.ndarray:
    """An OpenVINO tensor's values as a float32 array (numpy has no bf16: widen its bits)."""
    if tensor.get_element_type() == openvino.Type.bf16:
        return (tensor.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return tensor.data.astype(np.float32)
