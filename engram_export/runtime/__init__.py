"""Running exported layers beside a backbone.

- ``model.py``: ``EngramRuntime``, a mapping of layer id -> ``LayerRuntime`` over an ``.xml``, an
  ``.onnx`` or a folder of layers, loaded as ``options.py``'s ``RuntimeOptions`` say;
- ``backend.py``: what a runtime needs of a backend, and the one place that picks it:
  ``backend_openvino.py`` (two compiled stages, prefetch) or ``backend_onnxruntime.py`` (imported only
  for ``runtime="ort"``);
- ``remote_lookup.py``: the lookup stage of tables served by shards on Ray (``tables="ray://NAME"``);
- ``verification.py``: how far the runtime's files are verified (and the background pass);
- ``decode.py``: token-by-token decode sessions with the short conv's state kept inside OpenVINO;
- ``torch.py``: the PyTorch drop-in (``as_torch``, ``swap_engram_modules``), imported only when asked for.

The checks every call makes before anything runs (``check_inputs`` and the rest, exported here too) live
in ``contract/inputs.py``.
"""

from engram_export.contract.inputs import check_hidden, check_ids, check_inputs, check_lookup_inputs, check_out
from engram_export.runtime.model import EngramRuntime, LayerRuntime, Prefetch, UnknownLayer
from engram_export.runtime.options import RUNTIMES, RuntimeOptions

__all__ = [
    "EngramRuntime",
    "RuntimeOptions",
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
