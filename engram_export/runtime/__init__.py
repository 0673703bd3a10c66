"""Running exported layers beside a backbone.

- ``model.py``: ``EngramRuntime``, a mapping of layer id -> ``LayerRuntime`` over an ``.xml``, an
  ``.onnx`` or a folder of layers; OpenVINO (two compiled stages, prefetch) or ONNX Runtime;
- ``inputs.py``: the checks every call makes before anything runs;
- ``decode.py``: token-by-token decode sessions with the short conv's state kept inside OpenVINO.
"""

from engram_export.runtime.inputs import check_hidden, check_ids, check_inputs, check_lookup_inputs, check_out
from engram_export.runtime.model import RUNTIMES, EngramRuntime, LayerRuntime, Prefetch, UnknownLayer

__all__ = [
    "EngramRuntime",
    "LayerRuntime",
    "Prefetch",
    "UnknownLayer",
    "RUNTIMES",
    "check_inputs",
    "check_ids",
    "check_lookup_inputs",
    "check_hidden",
    "check_out",
]
