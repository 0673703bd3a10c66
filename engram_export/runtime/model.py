"""Run exported Engram layers: ``EngramRuntime(path)[layer](input_ids, hidden_states) -> output``.

``path`` is an ``.xml`` IR (OpenVINO), an ``.onnx`` file (OpenVINO, or ONNX Runtime with
``runtime="ort"``), or a folder of every layer with a manifest; ``EngramRuntime`` maps each layer id to
a ``LayerRuntime``. Inputs are checked against the config the file carries before anything runs, so a
wrong shape, dtype or id is refused with a one-line ``EngramError``, not a library trace. Prefetch and
decode sessions build on the OpenVINO backend's two stages (``openvino/stages.py``,
``runtime/decode.py``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engram_export.errors import EngramError, one_line
from engram_export.fileio import check_input_file
from engram_export.integrity import FileChecks, file_checks
from engram_export.model_info import PRECISIONS, ModelInfo
from engram_export.runtime.inputs import (
    _array,
    check_hidden,
    check_ids,
    check_inputs,
    check_lookup_inputs,
    check_out,
    fuse_feeds,
)
from engram_export.runtime.verification import Verification

__all__ = [
    "EngramRuntime",
    "LayerRuntime",
    "UnknownLayer",
    "Prefetch",
    "check_inputs",
    "check_ids",
    "check_lookup_inputs",
    "check_hidden",
    "check_out",
    "RUNTIMES",
]

RUNTIMES = ("ov", "ort")


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


class _OpenVINO:
    """Two compiled stages (``stages.split_stages``): lookup, then fuse on its output tensor."""

    def __init__(
        self,
        path: Path,
        precision: str | None,
        device: str,
        threads: int | None,
        ov_config: dict | None = None,
        table_memory: str = "mmap",
        lookup_kernel: bool = True,
        checks: FileChecks | None = None,
    ):
        from engram_export.openvino.compile import read_openvino
        from engram_export.openvino.stages import split_stages

        model, self.info = read_openvino(path, checks)
        self.path, self.device = path, device
        self.table_memory, self.lookup_kernel = table_memory, lookup_kernel
        self.precision = precision or self.info.precision
        self.config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if self.info.quantization in ("int8-weights", "int4-weights"):
            # The CPU plugin quantizes the activations of a compressed-weight MatMul per group, 32 by
            # default. Groups of 128 measured 1.15-1.4x faster (demo and V4.1, B=50 T=14, B=50 T=1,
            # B=1 T=1; Zen 4) for a mean cosine against bf16 of 0.99985 instead of 0.99988.
            self.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 128
        self.config.update(ov_config or {})
        self._model = model.clone()  # for the decode stages, built on first use (shares the constants)
        lookup, fuse = self._compile(*split_stages(model, self.precision))
        self.lookups, self.fuses = _RequestPool(lookup), _RequestPool(fuse)
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

    def _compile(self, lookup, fuse):
        """Both stages compiled, the lookup's table read by the extension's row kernel where it knows
        the table's form (``row_kernel.install``). A lookup left on OpenVINO's Gather over an f32 table
        (a DeepSeek-V4.1 checkpoint that stores one) is compiled without the CPU plugin's scan of f32
        constants for subnormals, which reads the whole table at every load (measured: +2 GiB resident for a
        2 GiB table, +28 MiB without); the lookup only gathers and converts, so the flag changes no value it
        computes. compile_model sets flush-to-zero on the thread that calls it with that flag and leaves it
        set, so that compile runs on a thread of its own: the caller's arithmetic keeps its subnormals."""
        from concurrent.futures import ThreadPoolExecutor

        from engram_export.openvino import row_kernel
        from engram_export.openvino.extension import openvino_core

        core = openvino_core()
        installed = self.lookup_kernel and row_kernel.install(lookup, self.table_memory)
        self._lookup_kind = f"row kernel, table {self.table_memory}" if installed else "openvino gather"
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

    def decode_requests(self):
        """A (lookup, fuse) pair of requests of the stateful decode stages, compiled once."""
        with self._decode_lock:
            if self._decode is None:
                from engram_export.runtime.decode import decode_stages

                self._decode = self._compile(*decode_stages(self._model.clone(), self.info, self.precision))
        return tuple(compiled.create_infer_request() for compiled in self._decode)

    def start_lookup(self, feeds: dict):
        """Start the lookup asynchronously (OpenVINO's threads, no GIL) on a request of its own. It
        reads ``feeds`` in place: they must not change until it is finished (``prefetch`` passes
        copies of its own)."""
        request = self.lookups.take()
        request.start_async(feeds, share_inputs=True)
        return request

    def finish(self, lookup, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Wait for ``lookup`` (from ``start_lookup(feeds)``), run the fuse stage on its embeddings, and
        give the lookup request back. The fuse stage reads ``hidden`` in place and writes straight into
        ``out`` (a new array if None): no copy of either, as large as the layer's output."""
        import openvino

        from engram_export.openvino.stages import EMBEDDINGS

        try:
            lookup.wait()
            fuse = self.fuses.take()
            try:
                result = np.empty(hidden.shape, np.float32) if out is None else out
                fuse.set_tensor(EMBEDDINGS, lookup.get_output_tensor(0))
                fuse.set_output_tensor(0, openvino.Tensor(result, shared_memory=True))
                fuse.start_async({"hidden_states": hidden, **fuse_feeds(feeds)}, share_inputs=True)
                fuse.wait()
                return result
            finally:
                self.fuses.give_back(fuse)
        finally:
            self.lookups.give_back(lookup)

    def profile(self, feeds: dict, hidden: np.ndarray, rounds: int, warmup: int) -> list[dict]:
        """OpenVINO's per-node times of both stages, averaged over ``rounds`` calls after ``warmup``."""
        import collections

        from engram_export.openvino.stages import EMBEDDINGS, infer

        if self.fuses.compiled.get_property("PERF_COUNT") not in (True, "YES"):  # the CPU plugin says "NO"
            raise EngramError("profile needs per-node counters: load with ov_config={'PERF_COUNT': True}")
        lookup, fuse = self.lookups.take(), self.fuses.take()
        totals = collections.Counter()
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
            request.wait()
            return _as_float32(request.get_output_tensor(0))
        finally:
            self.lookups.give_back(request)

    def __call__(self, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        with self._streams:
            return self.finish(self.start_lookup(feeds), feeds, hidden, out)


def _as_float32(tensor) -> np.ndarray:
    """An OpenVINO tensor's values as a float32 array (numpy has no bf16: widen its bits)."""
    import openvino

    if tensor.get_element_type() == openvino.Type.bf16:
        return (tensor.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return tensor.data.astype(np.float32)


class _OnnxRuntime:
    """An ``onnxruntime.InferenceSession``: its ``run`` is safe to call from many threads. The file is
    read once (``read_onnx_file``, which checks it); the session gets the graph from memory and maps
    the external data from the file's folder."""

    def __init__(self, path: Path, threads: int | None, checks: FileChecks | None = None):
        import onnx_ir as ir
        import onnxruntime

        from engram_export.onnx.files import read_onnx_file

        model, self.info = read_onnx_file(path, checks)
        self.precision = "f32"
        self.settings = {"onnxruntime": onnxruntime.__version__}
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngramError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def __call__(self, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        result = self.session.run(["output"], {**feeds, "hidden_states": hidden})[0]
        if out is None:
            return result
        out[...] = result
        return out


class Prefetch:
    """What ``EngramRuntime.prefetch`` returns: each layer's lookup in flight, on a request it owns.

    Any number of handles may be in flight at once; each layer of a handle is fused once. A handle
    dropped unused gives its requests back to their pools.
    """

    def __init__(self, feeds: dict, lookups: dict):
        self.feeds = feeds
        self.input_ids = feeds["input_ids"]
        self._lookups = lookups  # layer id -> (backend, request); removed when fused
        self._made_for = {layer: backend for layer, (backend, _) in lookups.items()}
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until every lookup not yet fused has finished."""
        with self._lock:
            for _, request in self._lookups.values():
                request.wait()

    def _take(self, layer: int, backend):
        """The lookup request of ``layer``, once: refused for another runtime or a second use."""
        with self._lock:
            if self._made_for.get(layer) is not backend:
                raise EngramError(f"this prefetch handle was not made by this runtime for layer {layer}")
            if layer not in self._lookups:
                raise EngramError(f"this prefetch handle was already used for layer {layer}")
            return self._lookups.pop(layer)[1]

    def __del__(self):
        for backend, request in getattr(self, "_lookups", {}).values():
            request.wait()
            backend.lookups.give_back(request)


class UnknownLayer(EngramError, KeyError):
    """A layer id the runtime does not serve: an ``EngramError`` with its one line, and a ``KeyError``
    as a mapping's ``get`` expects."""

    __str__ = EngramError.__str__  # the message, not KeyError's quoted key


class LayerRuntime:
    """One exported Engram layer, ready to run (what ``EngramRuntime``'s mapping holds per layer id).

    ``layer(input_ids, hidden_states)`` runs it; ``layer.prefetch(input_ids)`` starts its lookup in the
    background and ``layer.fuse(handle, hidden_states)`` finishes it; ``layer.lookup(input_ids)`` returns
    the looked-up rows. Every call checks its inputs against the config the file carries first.
    """

    def __init__(self, path: Path, runtime: str, backend):
        self.path, self.runtime, self._backend = path, runtime, backend
        self.info = backend.info
        self.precision = backend.precision
        self.settings = backend.settings  # what the runtime compiled the model with
        self._verification = Verification()  # an EngramRuntime shares its own with its layers

    @property
    def config(self):
        return self.info.config

    @property
    def quantization(self) -> str | None:
        return self.info.quantization

    @property
    def layer_id(self) -> int:
        return self.info.layer_id

    @property
    def layers(self) -> dict:
        """Layer id -> LayerRuntime, as for an ``EngramRuntime``: this layer alone."""
        return {self.layer_id: self}

    def __call__(self, input_ids, hidden_states, token_mask=None, *, out=None) -> np.ndarray:
        """The layer's output [B,T,G,D] float32: the Engram output before the backbone's residual add
        (demo family), or ``h + gate * value`` (DeepSeek-V4.1, whose ``token_mask`` marks image tokens
        False). ``out``: a float32 array of that shape to write it into (returned), instead of a new one."""
        self._verification.check()
        feeds, hidden = check_inputs(self.info, input_ids, hidden_states, token_mask)
        return self._backend(feeds, hidden, check_out(out, hidden))

    def lookup(self, input_ids, token_mask=None) -> np.ndarray:
        """The looked-up rows as the fuse stage receives them, float32 (dequantized for FP8 and INT8
        tables): the host half of the host-lookup / device-fuse split (OpenVINO only)."""
        self._need_openvino("lookup")
        self._verification.check()
        return self._backend.lookup_rows(check_lookup_inputs(self.info, input_ids, token_mask))

    def profile(self, input_ids, hidden_states, token_mask=None, rounds: int = 10, warmup: int = 3) -> list[dict]:
        """OpenVINO's per-node times of this layer's two stages (lookup, fuse) on these inputs: one dict
        per node (stage, node type, kernel, name, ms per call), slowest first. Needs a runtime loaded with
        ``ov_config={"PERF_COUNT": True}`` (the counters cost a little on every call)."""
        self._need_openvino("profile")
        self._verification.check()
        for name, value in (("rounds", rounds), ("warmup", warmup)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (name == "rounds"):
                raise EngramError(f"{name} must be a {'positive' if name == 'rounds' else 'non-negative'} integer")
        feeds, hidden = check_inputs(self.info, input_ids, hidden_states, token_mask)
        return self._backend.profile(feeds, hidden, rounds, warmup)

    def prefetch(self, input_ids, token_mask=None) -> Prefetch:
        """Start this layer's lookup for ``input_ids`` [B,T] and return at once (see ``Prefetch``)."""
        return _prefetch(self.info, self.layers, input_ids, token_mask)

    def fuse(self, handle: Prefetch, hidden_states, input_ids=None, *, out=None) -> np.ndarray:
        """Finish this layer from a prefetch handle: the output of ``layer(input_ids, hidden_states)``.

        ``input_ids``, if given, must be the ids the handle was made for. Every check comes before the
        handle is used, so a refused call leaves it as it was."""
        self._verification.check()
        if not isinstance(handle, Prefetch):
            raise EngramError(f"fuse needs the handle returned by prefetch, got {type(handle).__name__}")
        if input_ids is not None and not np.array_equal(_array("input_ids", input_ids), handle.input_ids):
            raise EngramError("this prefetch handle was made for other input_ids")
        hidden = check_hidden(self.info, handle.feeds, hidden_states)
        out = check_out(out, hidden)
        return self._backend.finish(handle._take(self.layer_id, self._backend), handle.feeds, hidden, out)

    def session(self, batch_size: int):
        """A decode session for ``batch_size`` sequences of this layer (OpenVINO only)."""
        from engram_export.runtime.decode import DecodeSession

        return DecodeSession(self, batch_size)

    def as_torch(self):
        """This layer as a PyTorch module (``engram_export.torch.OpenVINOEngram``)."""
        from engram_export.torch import OpenVINOEngram

        return OpenVINOEngram(self)

    def _need_openvino(self, what: str) -> None:
        if not isinstance(self._backend, _OpenVINO):
            raise EngramError(f"{what} needs the OpenVINO runtime (runtime='ov')")

    def _decode_requests(self):
        self._need_openvino("decode sessions")
        self._verification.check()
        return self._backend.decode_requests()

    def __repr__(self) -> str:
        return (
            f"LayerRuntime({str(self.path)!r}, runtime={self.runtime!r}, precision={self.precision!r}, "
            f"layer={self.layer_id})"
        )


def _prefetch(info: ModelInfo, layers: dict, input_ids, token_mask) -> Prefetch:
    """Start the lookup of each of ``layers`` (layer id -> LayerRuntime) on requests of their own."""
    for layer in layers.values():
        layer._need_openvino("prefetch")
        layer._verification.check()
    # copies: the lookups read them after this returns, when the caller may have changed its arrays
    feeds = {name: value.copy() for name, value in check_lookup_inputs(info, input_ids, token_mask).items()}
    return Prefetch(
        feeds, {layer_id: (layer._backend, layer._backend.start_lookup(feeds)) for layer_id, layer in layers.items()}
    )


class EngramRuntime(Mapping):
    """Exported Engram layers, ready to run: a mapping of layer id -> ``LayerRuntime``.

    Args:
        path: ``.xml`` (OpenVINO IR from ``compile`` or ``quantize``), ``.onnx`` (from ``export``), or a
            folder with a ``manifest.json`` holding every layer of a model.
        runtime: ``"ov"`` (OpenVINO, the default) or ``"ort"`` (ONNX Runtime, ``.onnx`` only).
        precision: OpenVINO inference precision, ``"f32"`` or ``"bf16"``; default: the file's own.
        device: OpenVINO device name.
        threads: CPU threads, default all.
        table_memory: how the table lives in memory: ``"mmap"`` (default; the file's pages, read on
            demand), ``"populate"`` (every page read at load) or ``"hugepages"`` (an anonymous copy in
            transparent huge pages); costs in ``row_kernel``'s docstring and the README.
        lookup_kernel: read the table with the extension's row kernel (default) or, with False, with
            OpenVINO's own Gather and decode ops (for comparison; ``table_memory`` is then ignored).
        ov_config: OpenVINO properties passed to ``compile_model`` over the defaults (precision hint,
            ``PERFORMANCE_HINT: LATENCY``); e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}`` for a server
            whose threads share the runtime (measured: 2 threads then run faster than 1).
        check_hashes: how every file is checked against the fingerprint recorded when it was written
            (a folder's manifest; a single file's record of its .bin, external data and tables), before
            loading: ``True`` (default: every byte of each file up to 1 GiB, larger ones by size and
            sampled SHA-256), ``"background"`` (the same, then a low-priority thread hashes the larger
            ones whole; a file that differs makes every later call fail), ``"full"`` (every byte now),
            ``"sampled"``, ``False``/``"size"``. ``rt.verification`` says how far it got
            (``runtime/verification.py``).

    ``rt[L]`` (or ``rt.layer(L)``) is layer L; ``for L in rt``, ``len(rt)``, ``rt.items()`` as for a dict.
    ``rt.prefetch(input_ids)`` starts every layer's lookup (hash + table Gather) in the background and
    returns at once; ``rt[L].fuse(handle, hidden_states)`` finishes layer L when the backbone reaches it;
    ``rt.session(B)`` decodes token by token over every layer. Results equal the one-shot call. A
    runtime of one file (one layer) is also called like that layer: ``rt(input_ids, hidden_states)``.
    """

    __eq__ = object.__eq__  # a runtime is one loaded model, not a value: identity, and hashable
    __hash__ = object.__hash__

    def __init__(
        self,
        path: str | Path,
        runtime: str = "ov",
        precision: str | None = None,
        device: str = "CPU",
        threads: int | None = None,
        check_hashes: bool | str = True,
        ov_config: dict | None = None,
        table_memory: str = "mmap",
        lookup_kernel: bool = True,
    ):
        from engram_export.openvino.row_kernel import TABLE_MEMORY

        if runtime not in RUNTIMES:
            raise EngramError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if precision is not None and precision not in PRECISIONS:
            raise EngramError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(device, str) or not device:
            raise EngramError(f"device must be an OpenVINO device name such as 'CPU', got {device!r}")
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 4096
        ):
            raise EngramError(f"threads must be a positive integer or None, got {threads!r}")
        if ov_config is not None and (
            not isinstance(ov_config, dict) or not all(isinstance(k, str) for k in ov_config)
        ):
            raise EngramError(f"ov_config must be a dict of OpenVINO property names, got {ov_config!r}")
        if table_memory not in TABLE_MEMORY:
            raise EngramError(f"table_memory must be one of {', '.join(TABLE_MEMORY)}, got {table_memory!r}")
        if not isinstance(lookup_kernel, bool):
            raise EngramError(f"lookup_kernel must be True or False, got {lookup_kernel!r}")
        checks = file_checks(check_hashes)
        self.path, self.runtime = Path(path), runtime
        options = (runtime, precision, device, threads, ov_config, table_memory, lookup_kernel)
        if self.path.is_dir():
            from engram_export.manifest import read_manifest

            self.manifest = read_manifest(self.path, checks)
            self._layers = {}
            for layer_id, name in self.manifest.layers.items():
                file = self.path / name
                served = _load_layer(file, *options, FileChecks("size"))  # the manifest's checks are done
                if served.layer_id != layer_id:
                    raise EngramError(
                        f"{file} holds layer {served.layer_id}; the manifest lists it as layer {layer_id}"
                    )
                if served.config != self.manifest.config:
                    raise EngramError(f"{file} was exported with another config than the manifest's")
                self._layers[layer_id] = served
        else:
            self.manifest = None
            served = _load_layer(check_input_file(path, (".xml", ".onnx"), "model"), *options, checks)
            self._layers = {served.layer_id: served}
        self.verification = Verification(checks, background=check_hashes == "background")
        for served in self._layers.values():
            served._verification = self.verification
        first = next(iter(self._layers.values()))
        self.info, self.precision, self.settings = first.info, first.precision, first.settings

    # the mapping: layer id -> LayerRuntime
    def __getitem__(self, layer_id: int) -> LayerRuntime:
        if layer_id not in self._layers:
            raise UnknownLayer(f"no Engram layer {layer_id} here (layers: {self.layer_ids})")
        return self._layers[layer_id]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, layer_id) -> bool:
        return layer_id in self._layers

    def layer(self, layer_id: int) -> LayerRuntime:
        """The runtime of one Engram layer: ``rt[layer_id]``."""
        return self[layer_id]

    @property
    def layer_ids(self) -> list[int]:
        return list(self._layers)

    @property
    def layers(self) -> dict:
        """Layer id -> LayerRuntime (a copy: the runtime's own mapping does not change)."""
        return dict(self._layers)

    @property
    def config(self):
        return self.info.config

    @property
    def quantization(self) -> str | None:
        return self.info.quantization

    @property
    def layer_id(self) -> int:
        return self._only("layer_id").layer_id

    def _only(self, what: str) -> LayerRuntime:
        if len(self._layers) != 1:
            raise EngramError(f"{self.path} serves layers {self.layer_ids}: use rt[L].{what}")
        return next(iter(self._layers.values()))

    # a runtime of one layer is also called like that layer
    def __call__(self, input_ids, hidden_states, token_mask=None, *, out=None) -> np.ndarray:
        """``LayerRuntime.__call__`` of the one layer served."""
        return self._only("__call__ (rt[L](...))")(input_ids, hidden_states, token_mask, out=out)

    def lookup(self, input_ids, token_mask=None) -> np.ndarray:
        """``LayerRuntime.lookup`` of the one layer served."""
        return self._only("lookup(...)").lookup(input_ids, token_mask)

    def fuse(self, handle: Prefetch, hidden_states, input_ids=None, *, out=None) -> np.ndarray:
        """``LayerRuntime.fuse`` of the one layer served."""
        return self._only("fuse(...)").fuse(handle, hidden_states, input_ids, out=out)

    # over every layer
    def prefetch(self, input_ids, token_mask=None) -> Prefetch:
        """Start the lookup of every layer for ``input_ids`` [B,T] and return at once.

        Each call's lookups run on requests of their own: several handles may be in flight at once."""
        return _prefetch(self.info, self._layers, input_ids, token_mask)

    def as_torch(self) -> dict:
        """Each layer as a PyTorch module (``engram_export.torch.OpenVINOEngram``): layer id -> module.
        ``engram_export.torch.swap_engram_modules`` puts them into a model in place of its PyTorch ones."""
        return {layer_id: layer.as_torch() for layer_id, layer in self._layers.items()}

    def session(self, batch_size: int):
        """A decode session for ``batch_size`` sequences over every layer served (OpenVINO only)."""
        from engram_export.runtime.decode import DecodeSession

        return DecodeSession(self, batch_size)

    def __repr__(self) -> str:
        return (
            f"EngramRuntime({str(self.path)!r}, runtime={self.runtime!r}, "
            f"precision={self.precision!r}, layers={self.layer_ids})"
        )


def _load_layer(path: Path, runtime, precision, device, threads, ov_config, table_memory, lookup_kernel, checks):
    if runtime == "ort":
        if path.suffix != ".onnx":
            raise EngramError(f"ONNX Runtime runs .onnx files, not {path.name}; use runtime 'ov'")
        if precision not in (None, "f32"):
            raise EngramError("ONNX Runtime runs this model in f32 only")
        return LayerRuntime(path, runtime, _OnnxRuntime(path, threads, checks))
    return LayerRuntime(
        path, runtime, _OpenVINO(path, precision, device, threads, ov_config, table_memory, lookup_kernel, checks)
    )
