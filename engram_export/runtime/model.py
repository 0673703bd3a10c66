"""Run exported Engram layers: ``EngramRuntime(path)[layer](input_ids, hidden_states) -> output``.

``path`` is an ``.xml`` IR (OpenVINO), an ``.onnx`` file (OpenVINO, or ONNX Runtime with
``runtime="ort"``), or a folder of every layer with a manifest; ``EngramRuntime`` maps each layer id to
a ``LayerRuntime``. Inputs are checked against the config the file carries before anything runs, so a
wrong shape, dtype or id is refused with a one-line ``EngramError``, not a library trace. Prefetch and
decode sessions build on the OpenVINO backend's two stages (``openvino/stages.py``,
``runtime/decode.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engram_export.contract.inputs import (
    _array,
    check_hidden,
    check_ids,
    check_inputs,
    check_lookup_inputs,
    check_out,
)
from engram_export.contract.model_info import ModelInfo
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_input_file
from engram_export.core.integrity import FileChecks
from engram_export.core.resources import available_memory
from engram_export.folders.manifest import Manifest, read_manifest
from engram_export.openvino.stages import wait
from engram_export.openvino.table_store import TableStore, TieredStore
from engram_export.runtime.backend import load_backend, supports_stages
from engram_export.runtime.decode import DecodeSession
from engram_export.runtime.options import RUNTIMES, RuntimeOptions
from engram_export.runtime.verification import Verification
from engram_export.sharding.client import ShardedTables

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
                wait(request)

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
            with contextlib.suppress(RuntimeError):  # a failed lookup: the request is still reusable
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
        # what runs, and what was asked for (the option, else the file's): they differ where the device
        # has no kernels for the precision asked (bf16 on an AVX2-only CPU runs f32; said once at load)
        self.precision, self.requested_precision = backend.precision, backend.requested_precision
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
        with self._verification.served():
            return self._backend(feeds, hidden, check_out(out, hidden))

    def lookup(self, input_ids, token_mask=None) -> np.ndarray:
        """The looked-up rows as the fuse stage receives them, float32 (dequantized for FP8 and INT8
        tables): the host half of the host-lookup / device-fuse split (OpenVINO only)."""
        self._need_openvino("lookup")
        self._verification.check()
        feeds = check_lookup_inputs(self.info, input_ids, token_mask)
        with self._verification.served():
            return self._backend.lookup_rows(feeds)

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
        with self._verification.served():
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
        lookup = handle._take(self.layer_id, self._backend)
        with self._verification.served():
            return self._backend.finish(lookup, handle.feeds, hidden, out, prefetched=True)

    def table_stats(self) -> dict:
        """How this layer's tiered table served its lookups (``table_memory="tiered"``), counts in rows
        since load: ``lookups``, ``hot_hits``, ``cache_hits``, ``rows_read`` (distinct rows per call read
        from the table file), ``bytes_read``, ``page_cache_rows`` (read without waiting: already in the
        page cache), ``queued_rows`` (read on the I/O threads), ``read_wait_ms`` (time calls waited for
        those), ``calls``, and ``prefetched_calls`` / ``prefetch_wait_ms``: how long ``fuse`` (or a decode
        step) still waited for its prefetched lookup (zero when the prefetch hid every read)."""
        self._need_openvino("table_stats")
        return self._backend.table_stats()

    def session(self, batch_size: int):
        """A decode session for ``batch_size`` sequences of this layer (OpenVINO only)."""
        return DecodeSession(self, batch_size)

    def as_torch(self):
        """This layer as a PyTorch module (``engram_export.runtime.torch.OpenVINOEngram``). The drop-in is
        imported here, so that a runtime loads PyTorch only when asked for a module."""
        from engram_export.runtime.torch import OpenVINOEngram

        return OpenVINOEngram(self)

    def _need_openvino(self, what: str) -> None:
        if not supports_stages(self._backend):
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


class LayerMapping(Mapping):
    """A loaded model's layers as a mapping of layer id -> what serves it (``self._layers``): ``x[L]``,
    ``for L in x``, ``len(x)``, ``x.items()``; an id not served is refused in one line. A loaded model, not
    a value: compared by identity, and hashable."""

    _layers: dict

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __getitem__(self, layer_id: int):
        if layer_id not in self._layers:
            raise UnknownLayer(f"no Engram layer {layer_id} here (layers: {self.layer_ids})")
        return self._layers[layer_id]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, layer_id) -> bool:
        return layer_id in self._layers

    @property
    def layer_ids(self) -> list[int]:
        return list(self._layers)


class EngramRuntime(LayerMapping):
    """Exported Engram layers, ready to run: a mapping of layer id -> ``LayerRuntime``.

    Args (the keywords after ``path`` make a ``RuntimeOptions``, checked there; or pass ``options=``):
        path: ``.xml`` (OpenVINO IR from ``compile`` or ``quantize``), ``.onnx`` (from ``export``), or a
            folder with a ``manifest.json`` holding every layer of a model.
        runtime: ``"ov"`` (OpenVINO, the default) or ``"ort"`` (ONNX Runtime, ``.onnx`` only).
        precision: OpenVINO inference precision, ``"f32"`` or ``"bf16"``; default: the file's own. A
            device without kernels for it runs f32 (said once, in one line): ``rt.precision`` is what
            runs, ``rt.requested_precision`` what was asked for.
        device: OpenVINO device name.
        threads: CPU threads, default all.
        table_memory: how the table lives in memory, a store of ``openvino/table_store.py``: ``"mmap"``
            (default; the file's pages, read on demand), ``"populate"`` (every page read at load),
            ``"hugepages"`` (an anonymous copy in transparent huge pages) or ``"tiered"`` (a folder made by
            ``engram-export calibrate``: its hot rows resident, the rest read from the table file;
            ``rt[L].table_stats()`` counts hits and reads).
        cache_budget: with ``"tiered"``, a size (``"2GiB"`` or bytes) of rows read lately kept in memory,
            split evenly over the layers (default 0: none).
        miss_reads: with ``"tiered"``, how the rows not in memory are read: ``"uring"`` (one batch
            submitted to an io_uring of the calling thread and waited for at once; refused in one line where
            io_uring is not allowed, e.g. by a container's seccomp filter), ``"readahead"`` (every read
            handed to the kernel's readahead at once, then read; no thread per read), ``"threads"`` (a pool
            of 64 threads, for file systems that ignore the readahead hint) or ``"auto"`` (default:
            ``"uring"`` where io_uring is allowed, else ``"readahead"``).
        hot_set_memory: with ``"tiered"``, where the hot rows live: ``"private"`` (default: a copy in
            huge pages, this process's own) or ``"shared"`` (the hot set files' pages, read at load and
            shared by every process on the host that serves the folder: an engine's ranks hold one copy).
        tables: ``"ray://NAME"``: the rows come from the shards ``engram-export serve-tables`` started under
            NAME (``docs/sharding.md``); the folder's table files are then not needed here.
        shard_deadline: with ``tables``, the seconds a call waits for a shard (its replicas, Ray's restart
            of them) before it fails in one line (default 10).
        ray_address: with ``tables``, the Ray cluster (default: ``RAY_ADDRESS``, else the one running here).
        lookup_kernel: read the table with the extension's row kernel (default) or, with False, with
            OpenVINO's own Gather and decode ops (for comparison; ``table_memory`` is then ignored).
        ov_config: OpenVINO properties passed to ``compile_model`` over the defaults (precision hint,
            ``PERFORMANCE_HINT: LATENCY``); e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}`` for a server
            whose threads share the runtime (docs/performance.md).
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

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, **settings):
        if options is not None and settings:
            raise EngramError(f"give options or keyword settings, not both (got {', '.join(settings)})")
        try:
            options = options if options is not None else RuntimeOptions(**settings)
        except TypeError as exc:  # an unknown keyword
            raise EngramError(f"EngramRuntime: {exc}") from exc
        if not isinstance(options, RuntimeOptions):
            raise EngramError(f"options must be a RuntimeOptions, got {type(options).__name__}")
        checks = options.file_checks()  # the whole load's: manifest, every layer's files, background pass
        self.path, self.runtime, self.options = Path(path), options.runtime, options
        self.manifest: Manifest | None
        if self.path.is_dir():
            self.manifest = read_manifest(self.path, checks)
            stores = tiered_stores(self.path, self.manifest, options)
            remote = remote_tables(self.path, self.manifest, options)
            self._layers = {}
            for layer_id, name in self.manifest.layers.items():
                file = self.path / name
                # files the manifest checked: checked by size now
                served = _load_layer(file, options, checks, stores.get(layer_id), remote)
                if served.layer_id != layer_id:
                    raise EngramError(
                        f"{file} holds layer {served.layer_id}; the manifest lists it as layer {layer_id}"
                    )
                if served.config != self.manifest.config:
                    raise EngramError(f"{file} was exported with another config than the manifest's")
                self._layers[layer_id] = served
            if remote is not None:
                remote.check()  # every shard answers, and serves what the layout says
        else:
            self.manifest = None
            if options.table_memory == "tiered":
                raise EngramError(
                    f"table_memory='tiered' serves a folder made by engram-export calibrate; {path} is one file"
                )
            if options.tables is not None:
                raise EngramError(
                    f"tables={options.tables!r} serves the layers of a folder (engram-export serve-tables); "
                    f"{path} is one file"
                )
            served = _load_layer(check_input_file(path, (".xml", ".onnx"), "model"), options, checks)
            self._layers = {served.layer_id: served}
        self.verification = Verification(
            checks,
            background=options.background_verification,
            guards=[layer._backend.file_guard for layer in self._layers.values()],
        )
        for served in self._layers.values():
            served._verification = self.verification
        first = next(iter(self._layers.values()))
        self.info, self.settings = first.info, first.settings
        self.precision, self.requested_precision = first.precision, first.requested_precision

    def layer(self, layer_id: int) -> LayerRuntime:
        """The runtime of one Engram layer: ``rt[layer_id]``."""
        return self[layer_id]

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
        """Each layer as a PyTorch module (``engram_export.runtime.torch.OpenVINOEngram``): layer id -> module.
        ``engram_export.runtime.torch.swap_engram_modules`` puts them into a model in place of its PyTorch ones."""
        return {layer_id: layer.as_torch() for layer_id, layer in self._layers.items()}

    def session(self, batch_size: int):
        """A decode session for ``batch_size`` sequences over every layer served (OpenVINO only)."""
        return DecodeSession(self, batch_size)

    def __repr__(self) -> str:
        return (
            f"EngramRuntime({str(self.path)!r}, runtime={self.runtime!r}, "
            f"precision={self.precision!r}, layers={self.layer_ids})"
        )


def _load_layer(
    path: Path,
    options: RuntimeOptions,
    checks: FileChecks | None,
    store: TableStore | None = None,
    remote: ShardedTables | None = None,
) -> LayerRuntime:
    return LayerRuntime(path, options.runtime, load_backend(path, options, checks, store, remote))


def remote_tables(folder: Path, manifest: Manifest, options: RuntimeOptions) -> ShardedTables | None:
    """The client of the tables ``options.tables`` names, after refusing tables served for another
    folder (another table, config or layers)."""
    if options.tables is None:
        return None
    from engram_export.sharding.cluster import connect, served_layout
    from engram_export.sharding.layout import layer_identity

    layout = served_layout(str(options.table_name), options.ray_address)
    served = sorted(int(layer) for layer in layout["identities"])
    if served != sorted(manifest.layers):
        raise EngramError(f"{options.tables} serves layers {served}; {folder} has layers {sorted(manifest.layers)}")
    for layer in manifest.layers:
        if layer_identity(folder, manifest, layer) != layout["identities"][str(layer)]:
            raise EngramError(
                f"{options.tables} serves another table for layer {layer} than {folder} holds "
                f"(their files or config differ; it serves {layout['folder']})"
            )
    return ShardedTables(connect(options.ray_address), layout, options.shard_deadline)


def tiered_stores(folder: Path, manifest: Manifest, options: RuntimeOptions) -> dict[int, TableStore]:
    """Layer id -> its ``TieredStore`` (``table_memory="tiered"``: the cache budget split evenly over the
    layers), after refusing a folder never calibrated or hot sets and caches that do not fit in memory."""
    if options.table_memory != "tiered":
        return {}
    hot = sum(manifest.files[name]["size"] for layer in manifest.layers for name in manifest.hot_set(layer))
    cache_budget = int(options.cache_budget)  # a size in bytes once the options are checked
    needed, available = hot + cache_budget, available_memory()
    if needed > available:
        raise EngramError(
            f"table_memory='tiered' keeps the hot sets ({hot / 2**30:.2f} GiB) and the cache "
            f"({cache_budget / 2**30:.2f} GiB) in RAM: {needed / 2**30:.2f} GiB needed, "
            f"{available / 2**30:.2f} GiB available"
        )
    cache = cache_budget // len(manifest.layers)
    return {
        layer: TieredStore(folder, name, cache, options.miss_reads, options.hot_set_memory)
        for layer, name in manifest.layers.items()
    }
