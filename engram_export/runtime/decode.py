"""Incremental decode: an Engram layer's state lives inside OpenVINO, one token per step.

Per sequence and layer the state is the last ``max_ngram_size - 1`` raw ids (the n-grams of the next
token reach back that far) and the last ``(kernel_size - 1) * max_ngram_size`` short-conv inputs. The
decode stages are the two runtime stages with that state as ReadValue/Assign variables (OpenVINO's
stateful models, as optimum-intel keeps KV caches): the hash reads the id history instead of pads,
the fused kernel reads the conv history instead of zeros, and both write the new history back. A
step moves no state through Python; ``reset`` starts every sequence over (pads and zeros again).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import openvino
from openvino import opset6
from openvino import opset13 as ops
from openvino.op.util import Variable, VariableInfo

from engram_export.contract.inputs import check_inputs, check_lookup_inputs, fuse_feeds
from engram_export.core.errors import EngramError
from engram_export.openvino.stages import EMBEDDINGS, infer, split_stages, wait

__all__ = ["decode_stages", "DecodeSession"]

IDS_STATE, MASK_STATE, CONV_STATE = "engram_ids_history", "engram_mask_history", "engram_conv_history"


def _only(model, type_name: str):
    ops = [op for op in model.get_ops() if op.get_type_name() == type_name]
    if len(ops) != 1:
        raise EngramError(
            f"decode needs an optimized export (one {type_name} op, found {len(ops)}); export without --no-optimize"
        )
    return ops[0]


def _state(name: str, start: np.ndarray, batch_like):
    """The state ``name`` for the batch of ``batch_like`` and its variable (for the Assign).

    The CPU plugin takes only constant state initializers (one that depends on an input fails to
    compile), so the state starts as one row, ``start``, broadcast to the batch; once assigned it
    holds a row per sequence and the broadcast changes nothing.
    """
    info = VariableInfo()
    info.variable_id = name
    info.data_type = openvino.Type(start.dtype)
    info.data_shape = openvino.PartialShape([-1, *start.shape[1:]])
    variable = Variable(info)
    stored = opset6.read_value(ops.constant(start), variable)
    shape = ops.concat([_batch_of(batch_like), ops.constant(np.array(start.shape[1:], np.int64))], 0)
    return ops.broadcast(stored, shape), variable


def _batch_of(value):

    return ops.gather(ops.shape_of(value), ops.constant(np.array([0], np.int64)), ops.constant(0))


def _recent(history, new, before: int):
    """The last ``before`` columns of history followed by ``new``."""
    return ops.slice(
        ops.concat([history, new], 1), np.array([-before]), np.array([2**31 - 1]), np.array([1]), np.array([1])
    )


def _stateful_lookup(lookup, info):
    """The lookup with the last N-1 raw ids (and, for DeepSeek-V4.1, their mask: a masked or
    not-yet-seen token blocks the n-grams that reach it) kept as state instead of pads."""
    hash_op = _only(lookup, "EngramHash")
    ids = hash_op.input_value(0)
    before = info.config.max_ngram_size - 1
    # raw pad ids to start with; i32 (the CPU plugin keeps no i64 state; ids are checked to fit)
    history, ids_variable = _state(IDS_STATE, np.full((1, before), info.config.pad_id, np.int32), ids)
    assigns = [
        openvino.op.assign(_recent(history, openvino.opset13.convert(ids, openvino.Type.i32), before), ids_variable)
    ]
    arguments = [hash_op.input_value(0), hash_op.input_value(1)]
    if info.takes_mask:  # u8 state (no boolean state in the CPU plugin): 0 = blocked, as before a sequence
        mask = hash_op.input_value(2)
        mask_history, mask_variable = _state(MASK_STATE, np.zeros((1, before), np.uint8), ids)
        assigns.append(
            openvino.op.assign(
                _recent(mask_history, openvino.opset13.convert(mask, openvino.Type.u8), before), mask_variable
            )
        )
        arguments += [mask, history.output(0), mask_history.output(0)]
    else:
        arguments.append(history.output(0))
    hash_op.set_arguments(arguments)
    hash_op.validate_and_infer_types()
    return openvino.Model(lookup.get_results(), assigns, lookup.get_parameters(), "engram_lookup_decode")


def _stateful_fuse(fuse, info):

    conv = _only(fuse, "EngramGatedShortConv")
    config = info.config
    reach, channels = (config.kernel_size - 1) * config.max_ngram_size, config.hc_mult * config.hidden_size
    history, variable = _state(CONV_STATE, np.zeros((1, reach, channels), np.float32), conv.input_value(1))
    conv.set_arguments([*conv.input_values(), history.output(0)])
    conv.validate_and_infer_types()
    # Assign takes a node: a same-type Convert (removed by the plugin) stands for the 2nd output
    assign = openvino.op.assign(ops.convert(conv.output(1), openvino.Type.f32), variable)
    return openvino.Model(fuse.get_results(), [assign], fuse.get_parameters(), "engram_fuse_decode")


def decode_stages(model, info, precision: str):
    """(lookup, fuse) stateful ``openvino.Model``s of an optimized Engram model (DeepSeek-V4.1 has no
    short conv: its fuse stage keeps no state)."""
    if not info.takes_mask:
        _only(model, "EngramGatedShortConv")  # refuse raw graphs before changing anything
    lookup, fuse = split_stages(model, precision)
    return _stateful_lookup(lookup, info), fuse if info.takes_mask else _stateful_fuse(fuse, info)


class DecodeSession:
    """Prefill, then one token per step, for a fixed batch of sequences, over every layer served.

    ``hidden_by_layer`` maps layer id -> hidden states [B,T,G,D] (for one layer, an array does);
    results come back the same way. A step may name some of the layers: a backbone steps each Engram
    layer at its depth, so the token's other layers follow in later calls with the same ids, before the
    next token. Every input is checked before any state changes, so a refused call leaves the session as
    it was. Calls from several threads are run one at a time.
    """

    def __init__(self, runtime, batch_size: int):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EngramError(f"batch size must be a positive integer, got {batch_size!r}")
        self.runtime, self.batch_size = runtime, batch_size
        self._layers = runtime.layers  # an EngramRuntime's layers, or one LayerRuntime
        # the layers of one runtime share its verification (and the guard over every layer's files)
        self._verification = next(iter(self._layers.values()))._verification
        self._requests = {layer_id: layer._decode_requests() for layer_id, layer in self._layers.items()}
        self._lock = threading.Lock()
        self.position = 0
        self._prefetched: tuple | None = None  # (feeds per layer, ids) of the step whose lookups are in flight
        self._token: tuple | None = None  # (ids, layers still to step) of a token some layers have stepped

    def reset(self) -> None:
        """Forget every sequence: the next call starts from pads and zeros."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._finish_prefetch(list(self._requests))
        self._token = None
        for lookup, fuse in self._requests.values():
            lookup.reset_state()
            fuse.reset_state()
        self.position = 0

    def prefill(self, input_ids, hidden_by_layer, token_mask=None) -> dict:
        """Start new sequences with a prompt of T tokens: outputs [B,T,G,D] per layer (``token_mask``
        [B,T] for DeepSeek-V4.1 models: False for image tokens)."""
        return self._run(input_ids, hidden_by_layer, token_mask, start=True)

    def step(self, next_ids, hidden_by_layer, token_mask=None) -> dict:
        """One more token per sequence ([B, 1] ids): outputs [B,1,G,D] per layer given (every layer, or
        some now and the rest in later calls with the same ids). After ``prefetch`` of these ids, each
        layer waits for its own lookup instead of running one."""
        return self._run(next_ids, hidden_by_layer, token_mask, start=False)

    def prefetch(self, next_ids, token_mask=None) -> None:
        """Start the next step's lookups now ([B, 1] ids), on OpenVINO's threads, and return: the table
        rows (from disk, for a tiered table) are read while the backbone runs; ``step`` with the same
        ids finishes them. A second prefetch before that step is refused."""
        self._verification.check()
        with self._lock:
            if self._token is not None:
                raise EngramError(f"layers {sorted(self._token[1])} have not stepped this token yet: step them first")
            if self._prefetched is not None:
                raise EngramError("a prefetch is already in flight: run its step first")
            feeds = {}
            for layer_id, layer in self._layers.items():
                feeds[layer_id] = {
                    k: v.copy() for k, v in check_lookup_inputs(layer.info, next_ids, token_mask).items()
                }
            shape = next(iter(feeds.values()))["input_ids"].shape
            if shape != (self.batch_size, 1):
                raise EngramError(f"prefetch takes the next token of each of {self.batch_size} sequences, got {shape}")
            for layer_id, layer_feeds in feeds.items():
                self._requests[layer_id][0].start_async(layer_feeds, share_inputs=True)
            self._prefetched = (feeds, next(iter(feeds.values())))

    def _finish_prefetch(self, layers) -> set:
        """Wait for the lookups in flight of ``layers``, if any; the layers whose lookups were prefetched."""
        if self._prefetched is None:
            return set()
        feeds = self._prefetched[0]
        done = {layer for layer in layers if layer in feeds}
        for layer_id in done:
            start = time.perf_counter_ns()
            wait(self._requests[layer_id][0])
            self._layers[layer_id]._backend.count_prefetch_wait(time.perf_counter_ns() - start)
            del feeds[layer_id]
        if not feeds:
            self._prefetched = None
        return done

    def _checked(self, input_ids, hidden_by_layer, token_mask=None) -> dict:
        """layer -> (lookup feeds, hidden), every input checked; nothing runs here."""
        if not isinstance(hidden_by_layer, dict):
            if len(self._requests) != 1:
                raise EngramError(f"give hidden states per layer, {{layer: array}}, for layers {list(self._requests)}")
            hidden_by_layer = {next(iter(self._requests)): hidden_by_layer}
        if not hidden_by_layer or not set(hidden_by_layer) <= set(self._requests):
            raise EngramError(
                f"hidden states are for layers {sorted(hidden_by_layer, key=str)}, the "
                f"session serves {sorted(self._requests)}"
            )
        checked = {
            layer: check_inputs(self._layers[layer].info, input_ids, hidden, token_mask)
            for layer, hidden in hidden_by_layer.items()
        }
        batch = next(iter(checked.values()))[0]["input_ids"].shape[0]
        if batch != self.batch_size:
            raise EngramError(f"this session decodes {self.batch_size} sequences, got a batch of {batch}")
        return checked

    def _run(self, input_ids, hidden_by_layer, token_mask, start: bool) -> dict:
        self._verification.check()
        checked = self._checked(input_ids, hidden_by_layer, token_mask)
        tokens = next(iter(checked.values()))[0]["input_ids"].shape[1]
        if not start and tokens != 1:
            raise EngramError(f"step takes one token per sequence, [B, 1]; got {tokens} tokens")
        with self._lock:
            first = next(iter(checked.values()))[0]
            if start and len(checked) != len(self._requests):
                raise EngramError(f"a prefill takes hidden states for every layer, {sorted(self._requests)}")
            if not start:
                self._check_token(first, set(checked))
            if start:
                self._reset()
            with self._verification.served():  # a file changed under any layer refuses the step
                prefetched = self._finish_prefetch(checked)
                outputs = {}
                for layer, (feeds, hidden) in checked.items():
                    lookup, fuse = self._requests[layer]
                    if layer not in prefetched:
                        infer(lookup, feeds)
                    fuse.set_tensor(EMBEDDINGS, lookup.get_output_tensor(0))
                    infer(fuse, {"hidden_states": hidden, **fuse_feeds(feeds)})
                    outputs[layer] = fuse.get_output_tensor(0).data.copy()
                left = (self._token[1] if self._token else set(self._requests)) - set(checked)
                self._token = (first, left) if left and not start else None
                if self._token is None:
                    self.position += tokens
        return outputs

    def _check_token(self, first: dict, layers: set) -> None:
        """A step's ids are those prefetched for it, and those of the token its other layers stepped."""
        if self._token is not None:
            ids, left = self._token
            if any(not np.array_equal(first[k], ids[k]) for k in ids):
                raise EngramError(f"layers {sorted(left)} have not stepped the last token yet: step them with its ids")
            if not layers <= left:
                raise EngramError(
                    f"layers {sorted(layers - left)} already stepped this token; layers {sorted(left)} have not"
                )
        pending = self._prefetched[1] if self._prefetched is not None else None
        if pending is not None and any(not np.array_equal(first[k], pending[k]) for k in pending):
            raise EngramError("this step's ids (or token_mask) differ from those prefetched for it")
