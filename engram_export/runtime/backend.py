"""What a runtime needs of a backend, and the one place that picks it.

Every backend runs a whole layer on checked inputs (``__call__``). The OpenVINO backend also runs it as
two stages, so that the lookup can start early (prefetch, decode sessions, ``lookup``, ``profile``):
``LayerRuntime`` asks ``supports_stages`` before using them. The ONNX Runtime backend is imported only
when ``runtime="ort"`` is asked for, so that a runtime on OpenVINO never loads ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from engram_export.contract.model_info import ModelInfo
from engram_export.core.integrity import FileChecks
from engram_export.openvino.table_store import TableStore
from engram_export.runtime.backend_openvino import OpenVINOBackend
from engram_export.runtime.options import RuntimeOptions
from engram_export.sharding.client import ShardedTables

__all__ = ["Backend", "load_backend", "supports_stages"]


class Backend(Protocol):
    info: ModelInfo
    precision: str
    settings: dict  # what the backend compiled the model with, for reports

    def __call__(self, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...


def load_backend(
    path: Path,
    options: RuntimeOptions,
    checks: FileChecks | None = None,
    store: TableStore | None = None,
    remote: ShardedTables | None = None,
) -> Backend:
    """The backend ``options.runtime`` names, loaded from ``path``, its files checked by ``checks``, its
    table placed by ``store`` (default: the store ``options.table_memory`` names) or served by the
    shards of ``remote``."""
    if options.runtime == "ort":
        from engram_export.runtime.backend_onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, options, checks)

    return OpenVINOBackend(path, options, checks, store, remote)


def supports_stages(backend: Backend) -> bool:
    """Whether ``backend`` runs a layer as two stages (lookup, then fuse)."""
    return isinstance(backend, OpenVINOBackend)
