"""The lookup stage of a runtime whose tables are served by shards (``EngramRuntime(tables="ray://NAME")``).

It stands where the compiled lookup stage's infer request stands (``start_async``, ``wait``,
``get_output_tensor``, ``reset_state``), so one-shot calls, prefetch, ``lookup`` and decode sessions run
unchanged. ``start_async`` hands the lookup to a thread of a pool and returns; there the ids are hashed
(the reference hash, bit-exact with the model's own) and the rows read through ``ShardedTables.read``:
each distinct row asked for once, from the shards that own it, and the stored bytes that come back
decoded by the row reader of the row API (``openvino/row_reader.py``, the lookup stage's own code):
the embeddings the local lookup makes, bit for bit. ``wait`` waits for that thread. A decode session's
request keeps the last ``max_ngram_size - 1`` ids (and, for DeepSeek-V4.1, their mask) as the stateful
lookup keeps them.
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import openvino

from engram_export.models.table_rows import hashing_of, table_rows
from engram_export.openvino.row_reader import RowReader
from engram_export.sharding.client import ShardedTables

__all__ = ["RemoteLookups", "RemoteLookupRequest"]

# take the shards' answers and decode them (threads that mostly wait on the network, and the row kernel)
_FINISHERS = ThreadPoolExecutor(16, thread_name_prefix="engram-remote")


class RemoteLookupRequest:
    """One lookup in flight at a time, as an OpenVINO infer request is."""

    def __init__(self, layer_id: int, config, tables: ShardedTables, reader: RowReader, output, stateful=False):
        self.layer_id, self.config, self.tables = layer_id, config, tables
        self._reader, (self._form, self._flat) = reader, output
        self._output: openvino.Tensor | None = None
        self._hashing = hashing_of(config)
        self._stateful = stateful
        self._pending: Future | None = None
        self.reset_state()

    def reset_state(self) -> None:
        """A new sequence: the history is pads (and, for DeepSeek-V4.1, blocked)."""
        before = self.config.max_ngram_size - 1
        self._history = (np.full((1, before), self.config.pad_id, np.int64), np.zeros((1, before), bool))

    def _rows(self, ids: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, tuple]:
        """Table rows [B, T, C] of ``ids`` (after the history, in a decode session), and the history after them."""
        before, history = 0, self._history
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        if self._stateful:
            history_ids, history_mask = (np.broadcast_to(h, (len(ids), h.shape[1])) for h in self._history)
            before = history_ids.shape[1]
            ids, mask = np.concatenate([history_ids, ids], 1), np.concatenate([history_mask, mask], 1)
            history = (ids[:, -before:].copy(), mask[:, -before:].copy())
        return table_rows(self._hashing, ids, mask, self.layer_id)[:, before:], history

    def start_async(self, feeds: dict, share_inputs: bool = True) -> None:
        """Start the lookup on a thread of the pool and return: it hashes, sends the shards their
        requests, takes the answers and decodes them while the caller goes on (a prefetch hides all of
        it). ``feeds`` are read there: they must not change until ``wait`` returns."""
        self._pending = _FINISHERS.submit(self._run, feeds)

    def _run(self, feeds: dict) -> None:
        rows, history = self._rows(np.asarray(feeds["input_ids"], np.int64), feeds.get("token_mask"))
        values = self._reader.new_out(rows.shape, self._form)  # [B, T, C, d]: f32, or bf16 bits
        self.tables.read(self.layer_id, np.ascontiguousarray(rows), values, self._reader, self._form)
        shape = (*rows.shape[:2], -1) if self._flat else values.shape  # as the lookup stage's output
        kind = openvino.Type.bf16 if self._form == "bf16" else openvino.Type.f32
        values = values.reshape(shape)
        self._output = openvino.Tensor(values, openvino.Shape(list(values.shape)), kind)
        self._history = history  # kept once the call succeeded: a failed step can be run again

    def wait(self) -> None:
        if self._pending is not None:
            finishing, self._pending = self._pending, None
            finishing.result()  # the EngramUnavailable of a shard that stayed down, as it was raised

    def get_output_tensor(self, index: int = 0):
        return self._output


class RemoteLookups:
    """Idle remote lookup requests of one layer (the backend's pool of lookup requests)."""

    def __init__(self, layer_id: int, config, tables: ShardedTables, reader: RowReader, output: tuple[str, bool]):
        """``output``: the lookup stage's (form, flat): ``"f32"`` or ``"bf16"``, and whether it ends as
        [B, T, C*d] (else [B, T, C, d])."""
        self.layer_id, self.config, self.tables = layer_id, config, tables
        self.reader, self.output = reader, output
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def take(self) -> RemoteLookupRequest:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.new(stateful=False)

    def new(self, stateful: bool) -> RemoteLookupRequest:
        return RemoteLookupRequest(self.layer_id, self.config, self.tables, self.reader, self.output, stateful)

    def give_back(self, request: RemoteLookupRequest) -> None:
        self._idle.put(request)
