"""What the released vLLM 0.33.0 and SGLang 0.5.23 need to import and run their Engram code on a CPU-only
torch (2.13.0+cpu), beside this package, in ``.venv-engines`` (``engines/install.sh``).

``install_cpu_shims()`` must run before vLLM, SGLang or triton is imported (``tests/engines/conftest.py``
calls it first thing):

- ``CUDA_VISIBLE_DEVICES=""`` and ``TRITON_INTERPRET=1``: ``vllm.triton_utils`` then keeps the real triton
  with no active driver (its "distributed env" branch) instead of a placeholder, and ``@triton.jit`` gives
  ``InterpretedFunction`` s, so the engines' own Triton kernels run on CPU tensors.
- a ``torchvision`` stub: SGLang imports ``torchvision.transforms`` at module level
  (``sglang/srt/multimodal/internvl_utils.py``, ``sglang/srt/configs/deepseek_ocr.py``) and PyPI's torchvision
  is a CUDA build that fails beside torch+cpu (``operator torchvision::nms does not exist``), so it is never
  installed. The stub only imports: anything taken from it raises when called.
"""

from __future__ import annotations

import enum
import importlib.machinery
import os
import sys
import types


def set_cpu_triton_env() -> None:
    """Triton kernels in the interpreter, no CUDA device: before ``vllm``/``triton`` is imported."""
    if "vllm" in sys.modules:
        raise RuntimeError("set_cpu_triton_env() must run before vllm is imported")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"


class _StubbedTorchvision:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is an import-only stub in .venv-engines (tests/engines/shims.py)")


class InterpolationMode(enum.Enum):
    """``torchvision.transforms.InterpolationMode``'s members (SGLang reads them at import)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubbedTorchvision

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module
    return module


def install_torchvision_stub() -> None:
    """Register an import-only ``torchvision`` (``.transforms`` with ``InterpolationMode``,
    ``.transforms.functional``), after transformers has cached ``is_torchvision_available() is False``:
    transformers keeps its no-torchvision paths (a stub it believed in would break vLLM's imports too)."""
    if "torchvision" in sys.modules:
        if getattr(sys.modules["torchvision"], "__version__", "") != "0.0.0+stub":
            raise RuntimeError("a real torchvision is imported: it must not be installed in .venv-engines")
        return
    from transformers.utils import import_utils

    # Both probes are lru_cached: evaluated now, before the stub is findable, they stay False.
    if import_utils.is_torchvision_available() or import_utils.is_torchvision_v2_available():
        raise RuntimeError("torchvision is installed: .venv-engines must not have it (engines/install.sh)")
    torchvision = _stub_module("torchvision")
    torchvision.__version__ = "0.0.0+stub"  # type: ignore[attr-defined]
    transforms = _stub_module("torchvision.transforms")
    functional = _stub_module("torchvision.transforms.functional")
    transforms.InterpolationMode = functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    torchvision.transforms = transforms  # type: ignore[attr-defined]


def install_cpu_shims() -> None:
    """Both shims, in order: the environment first (before vllm is imported)."""
    set_cpu_triton_env()
    install_torchvision_stub()
