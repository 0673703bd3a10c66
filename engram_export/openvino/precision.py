"""Which inference precision a device really runs, asked of OpenVINO (never assumed from the ISA).

A CPU without BF16 instructions (AVX2 only, say) lists ``FP32, INT8, BIN`` in its
``OPTIMIZATION_CAPABILITIES`` and runs a bf16 request as f32. The runtime then compiles f32 throughout
and reports ``precision="f32"``, and the one line of ``say_emulated`` tells the user once, where they
asked for bf16 (compile, runtime load, bench).
"""

from __future__ import annotations

import logging
import threading
from functools import cache

from engram_export.openvino.extension import openvino_core

__all__ = ["capabilities", "runs_as", "emulation_line", "say_emulated"]

log = logging.getLogger(__name__)
_CAPABILITY = {"f32": "FP32", "bf16": "BF16"}  # a precision hint -> its name in OPTIMIZATION_CAPABILITIES
_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()


@cache
def capabilities(device: str = "CPU") -> tuple[str, ...] | None:
    """The device's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``('FP32', 'INT8', 'BIN', 'EXPORT_IMPORT')``), or
    None for a device that does not say (a virtual one such as ``AUTO``)."""
    try:
        names = openvino_core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return None
    return tuple(str(name) for name in names)


def runs_as(precision: str, device: str = "CPU") -> str:
    """The precision ``device`` runs when asked for ``precision``: itself where the device has kernels
    for it (or does not say), else f32."""
    found = capabilities(device)
    return precision if found is None or _CAPABILITY[precision] in found else "f32"


def emulation_line(precision: str, device: str = "CPU") -> str | None:
    """One line saying that ``device`` runs ``precision`` as another, or None where it runs it."""
    ran = runs_as(precision, device)
    if ran == precision:
        return None
    return (
        f"this {device} has no {precision} kernels (OpenVINO OPTIMIZATION_CAPABILITIES: "
        f"{', '.join(capabilities(device) or ())}): {precision} runs as {ran} here"
    )


def say_emulated(precision: str, device: str = "CPU", where: str = "") -> str:
    """The precision ``device`` runs for ``precision``; where that is another, say so once per process
    (a WARNING on this module's logger, shown on stderr by the command line and by Python's last-resort
    handler)."""
    line = emulation_line(precision, device)
    if line is not None:
        with _said_lock:
            first = (precision, device) not in _said
            _said.add((precision, device))
        if first:
            log.warning("%s%s", f"{where}: " if where else "", line)
    return runs_as(precision, device)
