"""Every Engram layer of a model in one folder: ``manifest`` (what binds the folder's files),
``pipeline`` (export, compile and quantize folder to folder), ``calibration`` (``calibrate``: the hot
rows of a tiered table, chosen on real text) and ``synthetic`` (checkpoint folders of
any size with seeded weights, for random-init exports, tests and benches). Above ``onnx/`` and
``openvino/``, below the runtime, which reads manifests: the pipeline's names are imported on first use,
so reading a manifest does not load NNCF."""

import importlib

PIPELINE = (
    "export_folder",
    "export_checkpoint",
    "export_random_v41",
    "calibration_for",
    "compile_folder",
    "quantize_folder",
    "layer_file",
    "calibrate",
)
_MODULES = {"calibrate": "engram_export.folders.calibration"}  # the rest: engram_export.folders.pipeline

__all__ = list(PIPELINE)


def __getattr__(name: str):
    if name not in PIPELINE:
        raise AttributeError(f"module 'engram_export.folders' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES.get(name, "engram_export.folders.pipeline")), name)
    globals()[name] = value
    return value
