"""The ONNX Runtime backend: the exported .onnx on ONNX Runtime's CPU provider, f32 (a reference path:
no prefetch, decode sessions or row kernel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime

from engram_export.contract.model_info import external_locations
from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks
from engram_export.onnx.files import read_onnx_file
from engram_export.openvino.file_guard import guard_new_mappings
from engram_export.runtime.options import RuntimeOptions

__all__ = ["OnnxRuntimeBackend"]


class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession``: its ``run`` is safe to call from many threads. The file is
    read once (``read_onnx_file``, which checks it); the session gets the graph from memory and maps
    the external data from the file's folder."""

    def __init__(self, path: Path, options: RuntimeOptions, checks: FileChecks | None = None):
        if path.suffix != ".onnx":
            raise EngramError(f"ONNX Runtime runs .onnx files, not {path.name}; use runtime 'ov'")
        if options.precision not in (None, "f32"):
            raise EngramError("ONNX Runtime runs this model in f32 only")

        model, self.info = read_onnx_file(path, checks)
        self.precision = self.requested_precision = "f32"
        self.settings = {"onnxruntime": onnxruntime.__version__}
        session_options = onnxruntime.SessionOptions()
        session_options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.parent)
        )
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        graph = ir.to_proto(model).SerializeToString()
        try:
            # ONNX Runtime maps the external data itself: those mappings are guarded (openvino/file_guard.py)
            self.session, self.file_guard = guard_new_mappings(
                [path.parent / name for name in external_locations(model)],
                lambda: onnxruntime.InferenceSession(graph, session_options, providers=["CPUExecutionProvider"]),
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngramError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def __call__(self, feeds: dict, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        result = self.session.run(["output"], {**feeds, "hidden_states": hidden})[0]
        if out is None:
            return result
        out[...] = result
        return out
