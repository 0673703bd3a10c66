"""The lookup stage of a runtime whose tables are served by shards (``EngramRuntime(tables="ray://NAME")``).

It stands where the compiled lookup stage's infer request stands (``start_async``, ``wait``,
``get_output_tensor``, ``reset_state``), so one-shot calls, prefetch, ``lookup`` and decode sessions run
unchanged. ``start_async`` hashes the ids here (the reference hash, bit-exact with the model's own),
finds each distinct row once and sends the shards their requests; ``wait`` takes the stored bytes that
came back and runs the extension's row kernel on them (``row_kernel.rows_decoder``): the embeddings are
the ones the local lookup makes, bit for bit. A decode session's request keeps the last
``max_ngram_size - 1`` ids (and, for DeepSeek-V4.1, their mask) as the stateful lookup keeps them.
"""

from __future__ import annotations

import queue

import numpy as np

from engram_export.models.config import is_deepseek_v41
from engram_export.models.deepseek_v41 import V41Hashing
from engram_export.models.hashing import EngramHashing
from engram_export.openvino.stages import infer
from engram_export.sharding.client import Pending, ShardedTables

__all__ = ["RemoteLookups", "RemoteLookupRequest"]


class RemoteLookupRequest:
    """One lookup in flight at a time, as an OpenVINO infer request is."""

    def __init__(self, layer_id: int, config, tables: ShardedTables, decoder, stateful: bool = False):
        self.layer_id, self.config, self.tables = layer_id, config, tables
        self._decoder = decoder.create_infer_request()
        self._v41 = is_deepseek_v41(config)
        self._hashing = V41Hashing(config) if self._v41 else EngramHashing(config)
        self._stateful = stateful
        self._pending: tuple[np.ndarray, Pending | None, tuple] | None = None
        self.reset_state()

    def reset_state(self) -> None:
        """A new sequence: the history is pads (and, for DeepSeek-V4.1, blocked)."""
        before = self.config.max_ngram_size - 1
        pad = self.config.pad_token_id if self._v41 else self.config.pad_id
        self._history = (np.full((1, before), pad, np.int64), np.zeros((1, before), bool))

    def _rows(self, ids: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, tuple]:
        """Table rows [B, T, C] of ``ids`` (after the history, in a decode session), and the history
        after them (kept once the call succeeds: a failed step can be run again)."""
        before, history = 0, self._history
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        if self._stateful:
            history_ids, history_mask = (np.broadcast_to(h, (len(ids), h.shape[1])) for h in self._history)
            before = history_ids.shape[1]
            ids, mask = np.concatenate([history_ids, ids], 1), np.concatenate([history_mask, mask], 1)
            history = (ids[:, -before:].copy(), mask[:, -before:].copy())
        if self._v41:
            rows = self._hashing.rows(ids, mask, self.layer_id)
        else:
            rows = self._hashing.rows(ids, self.layer_id)
        return rows[:, before:], history

    def start_async(self, feeds: dict, share_inputs: bool = True) -> None:
        rows, history = self._rows(np.asarray(feeds["input_ids"], np.int64), feeds.get("token_mask"))
        unique, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.reshape(rows.shape).astype(np.int64)
        self._pending = (inverse, self.tables.request(self.layer_id, unique) if len(unique) else None, history)

    def wait(self) -> None:
        if self._pending is None:
            return
        inverse, pending, history = self._pending
        self._pending = None
        layout = self.tables.layouts[self.layer_id]
        parts = pending.result() if pending is not None else _no_rows(layout)
        infer(self._decoder, {"rows": inverse, **parts})
        self._history = history

    def get_output_tensor(self, index: int = 0):
        return self._decoder.get_output_tensor(index)


def _no_rows(layout) -> dict[str, np.ndarray]:
    parts = {part: np.zeros(size, np.uint8) for part, size in layout.part_sizes(0).items()}
    parts["codes"] = parts["codes"].reshape(0, layout.row_bytes)
    return parts


class RemoteLookups:
    """Idle remote lookup requests of one layer (the backend's pool of lookup requests)."""

    def __init__(self, layer_id: int, config, tables: ShardedTables, decoder):
        self.layer_id, self.config, self.tables, self.decoder = layer_id, config, tables, decoder
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def take(self) -> RemoteLookupRequest:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.new(stateful=False)

    def new(self, stateful: bool) -> RemoteLookupRequest:
        return RemoteLookupRequest(self.layer_id, self.config, self.tables, self.decoder, stateful)

    def give_back(self, request: RemoteLookupRequest) -> None:
        self._idle.put(request)
