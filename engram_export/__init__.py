"""engram-export: a trained Engram layer to ONNX, OpenVINO and a CPU runtime beside the backbone.

The package's folders: ``models/`` (the PyTorch layers of both families), ``passes/`` (ONNX graph
passes), ``onnx/`` (export and the custom ops), ``openvino/`` (compile, quantize, the C++ extension and
what the runtime does to an IR at load), ``runtime/`` (``EngramRuntime``, decode sessions), ``cli/``
(the ``engram-export`` command), ``measure/`` (verify and bench); the modules at this level are what they
all share (errors, file checks and integrity, manifests, progress) and ``torch.py``, the PyTorch drop-in.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["EngramRuntime", "EngramError"]

from engram_export.errors import EngramError

# Modules that moved into the folders above: old path -> new one. The old paths keep working for one
# release (0.2 removes them), with a DeprecationWarning at the importer's line.
MOVED = {
    "export": "onnx.export",
    "export_v41": "onnx.export_v41",
    "onnx_op": "onnx.op",
    "onnx_op_fp8": "onnx.op_fp8",
    "compile": "openvino.compile",
    "quantize": "openvino.quantize",
    "stages": "openvino.stages",
    "row_kernel": "openvino.row_kernel",
    "tables": "openvino.tables",
    "ov_extension": "openvino.extension",
    "decode": "runtime.decode",
    "inputs": "runtime.inputs",
    "bench": "measure.bench",
    "bench_lookup": "measure.bench_lookup",
    "bench_v41": "measure.bench_v41",
    "decode_bench": "measure.decode_bench",
    "verify": "measure.verify",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``engram_export.<old>`` as the module now at ``engram_export.<new>`` (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        return importlib.util.spec_from_loader(fullname, self) if package == __name__ and name in MOVED else None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}"
        # stacklevel 2: the importer's line (warnings skips the import system's own frames)
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in 0.2", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module at its new path is already executed


sys.meta_path.append(_MovedModules())


def __getattr__(name):
    # The runtime pulls in OpenVINO and ONNX Runtime; import it only when asked for.
    if name == "EngramRuntime":
        from engram_export.runtime import EngramRuntime

        return EngramRuntime
    raise AttributeError(name)
