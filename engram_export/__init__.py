"""engram-export: a trained Engram layer to ONNX, OpenVINO and a CPU runtime beside the backbone.

The names a user needs are here, each imported when first used (``import engram_export`` loads neither
PyTorch nor OpenVINO):

- ``EngramRuntime``: load an exported, compiled or quantized layer (or a folder of them) and run it;
- ``EngramRows``: a folder's table rows by id, for engines that hash and fuse themselves (the row API,
  which the vLLM and SGLang plug-ins of ``engines/`` use);
- ``EngramError``: what a bad input, file or config raises, in one line; its subclass
  ``EngramUnavailable``: what a resource that is not there now raises (a table shard down, a Ray cluster
  that cannot be reached);
- ``load_config``, ``build_layer``: a config (preset or JSON) and its PyTorch layer (weights or random);
- ``export_layer``, ``export_checkpoint``: a layer, or a DeepSeek-V4.1 checkpoint, to ONNX;
- ``compile_onnx``, ``quantize``, ``QuantizeOptions``: ONNX to OpenVINO IR, f32 / bf16 or NNCF-quantized.

The package's folders, from the ground up (``docs/design.md`` gives their levels): ``core/`` (errors,
progress, file checks and integrity, resources, text, checkpoint headers), ``models/`` (the configs,
hashes and PyTorch layers of both families), ``contract/`` (what an exported file says about itself, the
inputs it accepts), ``onnx/`` (export and the custom ops) and ``passes/`` (ONNX graph passes),
``openvino/`` (compile, quantize, the C++ extension and what the runtime does to an IR at load),
``folders/`` (manifests, whole-model folders, calibration) and ``sharding/`` (tables served on Ray),
``runtime/`` (``EngramRuntime``, decode sessions, ``rows.py``, the row API, and ``torch.py``, the
PyTorch drop-in), ``engines/`` (the vLLM and SGLang plug-ins), ``measure/`` (verify and the benches) and
``cli/`` (the ``engram-export`` command).
"""

import importlib

from engram_export.core.errors import EngramError, EngramUnavailable

_PUBLIC = {
    "EngramRuntime": "engram_export.runtime",
    "EngramRows": "engram_export.runtime.rows",
    "load_config": "engram_export.models.config",
    "build_layer": "engram_export.models.weights",
    "export_layer": "engram_export.onnx.export",
    "export_checkpoint": "engram_export.folders",
    "compile_onnx": "engram_export.openvino.compile",
    "quantize": "engram_export.openvino.quantize",
    "QuantizeOptions": "engram_export.openvino.quantize",
}

__all__ = ["EngramError", "EngramUnavailable", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engram_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
