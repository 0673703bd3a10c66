"""Every Engram layer of a model in one folder: ``manifest`` (what binds the folder's files),
``pipeline`` (export, compile and quantize folder to folder) and ``synthetic`` (checkpoint folders of
any size with seeded weights, for random-init exports, tests and benches). Above ``onnx/`` and
``openvino/``, below the runtime, which reads manifests."""

from engram_export.folders.pipeline import (
    calibration_for,
    compile_folder,
    export_checkpoint,
    export_folder,
    export_random_v41,
    layer_file,
    quantize_folder,
)

__all__ = [
    "export_folder",
    "export_checkpoint",
    "export_random_v41",
    "calibration_for",
    "compile_folder",
    "quantize_folder",
    "layer_file",
]
