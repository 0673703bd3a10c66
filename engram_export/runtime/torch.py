"""``engram_export.runtime.torch``: Engram layers served by OpenVINO as PyTorch modules.

``swap_engram_modules(model, runtime)`` replaces every PyTorch Engram layer inside ``model`` (the demo's
``EngramLayer``, DeepSeek-V4.1's ``V41EngramLayer``) by an ``OpenVINOEngram`` of the same layer and
registers a forward pre-hook on ``model`` that starts every layer's lookup from the model's input ids
(``runtime.prefetch``) the moment the model is called: the lookups run in OpenVINO's threads while the
backbone computes the layers before them, and each Engram module then only fuses. One loop, no other
change to the model::

    rt = EngramRuntime("compiled/")
    swap_engram_modules(model, rt)
    logits = model(input_ids)            # Engram layers now run in OpenVINO, lookups prefetched

Tensors go in and come out as torch tensors on the caller's device and dtype; float32 CPU tensors are
read in place (no copy), others are converted once on the way in and out.
"""

from __future__ import annotations

import threading
import typing

import numpy as np
import torch
from torch import nn

from engram_export.core.errors import EngramError
from engram_export.models.deepseek_v41 import V41EngramLayer
from engram_export.models.engram import EngramLayer

__all__ = ["OpenVINOEngram", "swap_engram_modules"]


def _numpy(value, dtype: torch.dtype):
    """A numpy view of a CPU ``dtype`` tensor (no copy); other tensors converted; non-tensors as they are
    (the runtime's own checks refuse what is not an array of numbers)."""
    if not isinstance(value, torch.Tensor):
        return value
    tensor = value.detach()
    if tensor.device.type != "cpu" or tensor.dtype != dtype:
        tensor = tensor.to("cpu", dtype)
    return tensor.contiguous().numpy()


class OpenVINOEngram(nn.Module):
    """One Engram layer in OpenVINO, called like the PyTorch one: ``forward(input_ids, hidden_states,
    token_mask=None)`` -> the layer's output, on ``hidden_states``' device and in its dtype.

    When the pre-hook of ``swap_engram_modules`` has started this layer's lookup for the same ids, the
    call only fuses; ``input_ids`` may then be omitted. Otherwise it runs the whole layer.
    """

    def __init__(self, runtime):
        super().__init__()
        layers = runtime.layers  # a LayerRuntime, or an EngramRuntime of one layer
        if len(layers) != 1:
            raise EngramError(f"OpenVINOEngram serves one layer: pass rt[L], not a runtime of layers {list(layers)}")
        (runtime,) = layers.values()
        self.runtime, self.layer_id = runtime, runtime.layer_id
        self._pending = None  # (prefetch handle, ids, mask) from the model's pre-hook
        self._lock = threading.Lock()

    def prefetched(self, handle, input_ids: np.ndarray, token_mask) -> None:
        with self._lock:
            self._pending = (handle, input_ids, token_mask)

    def forward(self, input_ids=None, hidden_states=None, token_mask=None) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor):
            raise EngramError(f"hidden_states must be a torch tensor, got {type(hidden_states).__name__}")
        hidden = _numpy(hidden_states, torch.float32)
        ids = None if input_ids is None else _numpy(input_ids, torch.int64)
        mask = None if token_mask is None else _numpy(token_mask, torch.bool)
        with self._lock:
            pending, self._pending = self._pending, None
        if (
            pending is not None
            and (ids is None or np.array_equal(ids, pending[1]))
            and (mask is None or np.array_equal(mask, pending[2]))
        ):
            out = self.runtime.fuse(pending[0], hidden)
        elif ids is None:
            raise EngramError(f"Engram layer {self.layer_id}: input_ids are needed (no lookup was prefetched)")
        else:
            out = self.runtime(ids, hidden, mask)
        return torch.from_numpy(out).to(hidden_states.device, hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, precision={self.runtime.precision!r}"


def _engram_layer_types() -> tuple[type, ...]:

    return EngramLayer, V41EngramLayer


def swap_engram_modules(
    model: nn.Module, runtime, input_ids: str = "input_ids", token_mask: str | None = None
) -> list[str]:
    """Replace every PyTorch Engram layer in ``model`` by the OpenVINO one of ``runtime`` (a folder of
    layers or one layer) and prefetch their lookups from ``model``'s input ids; returns the names of the
    replaced modules.

    ``input_ids`` (and, for DeepSeek-V4.1, ``token_mask``): the keyword of ``model.forward`` that holds
    them (the first positional argument is taken for the ids when the keyword is not given). Every layer
    is checked (layer served, same config) before anything is replaced."""
    found: list[tuple[str, typing.Any]] = [
        (name, module) for name, module in model.named_modules() if isinstance(module, _engram_layer_types())
    ]
    if not found:
        raise EngramError("the model holds no Engram layer (EngramLayer or V41EngramLayer)")
    if found[0][0] == "":
        raise EngramError("the model is itself an Engram layer: use rt.as_torch()[layer] in its place")
    layers = runtime.layers  # an EngramRuntime's layers, or one LayerRuntime
    for name, module in found:
        if module.layer_id not in layers:
            raise EngramError(f"{name} is Engram layer {module.layer_id}; the runtime serves {list(layers)}")
        if module.config != runtime.config:
            raise EngramError(f"{name} has another config than the runtime's model")
    swapped = {}
    for name, module in found:
        parent_name, _, attribute = name.rpartition(".")
        served = OpenVINOEngram(layers[module.layer_id])
        model.get_submodule(parent_name).register_module(attribute, served)  # also replaces list entries
        swapped[name] = served

    def start_lookups(_, args, kwargs):
        ids = kwargs.get(input_ids, args[0] if args else None)
        mask = kwargs.get(token_mask) if token_mask else None
        if ids is None:
            return
        ids, mask = _numpy(ids, torch.int64), None if mask is None else _numpy(mask, torch.bool)
        handle = runtime.prefetch(ids, mask)
        for served in swapped.values():
            served.prefetched(handle, handle.input_ids, None if mask is None else handle.feeds["token_mask"])

    model.register_forward_pre_hook(start_lookups, with_kwargs=True)
    return list(swapped)
