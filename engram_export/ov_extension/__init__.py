"""The OpenVINO extension (C++) that runs the Engram hash bit-exactly on CPU, built on first use.

The library is compiled with CMake against the headers and CMake config that ship in the ``openvino``
wheel, once per OpenVINO version and source revision, into ``$ENGRAM_EXPORT_CACHE`` (default
``~/.cache/engram-export``). Every OpenVINO entry point of this package loads it through
``openvino_core()``, so users never pass an extension path by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from engram_export.errors import EngramError

__all__ = ["library_path", "openvino_core", "HASH_OP_TYPE"]

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent
HASH_OP_TYPE = "EngramHash"
_LIBRARY = "libengram_ov_extension.so"


def _cache_dir() -> Path:
    import openvino

    sources = b"".join((SOURCE_DIR / name).read_bytes()
                       for name in ("CMakeLists.txt", "engram_ov_extension.cpp"))
    key = hashlib.sha256(sources + openvino.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("ENGRAM_EXPORT_CACHE", Path.home() / ".cache" / "engram-export"))
    return root / f"ov-extension-{key}"


def _build(target: Path) -> None:
    import openvino

    cmake = shutil.which("cmake")
    if cmake is None:
        raise EngramError("building the OpenVINO extension needs cmake and a C++17 compiler on PATH")
    ov_cmake_dir = Path(openvino.__file__).parent / "cmake"
    print(f"engram-export: building the OpenVINO hash extension (once) into {target.parent}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="engram-ov-build-") as build:
        for step in ([cmake, "-S", str(SOURCE_DIR), "-B", build, f"-DOpenVINO_DIR={ov_cmake_dir}"],
                     [cmake, "--build", build, "-j", str(os.cpu_count() or 1)]):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise EngramError(f"building the OpenVINO extension failed:\n{done.stdout[-3000:]}"
                                  f"{done.stderr[-3000:]}")
        staged = target.with_suffix(".tmp")
        shutil.copy2(Path(build) / _LIBRARY, staged)
        os.replace(staged, target)


def library_path() -> Path:
    """Path of the compiled extension, building it first if this OpenVINO has none yet."""
    directory = _cache_dir()
    target = directory / _LIBRARY
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:  # one build at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(target)
    return target


@cache
def openvino_core():
    """The process's ``openvino.Core`` with the Engram extension loaded."""
    import openvino

    core = openvino.Core()
    core.add_extension(str(library_path()))
    return core
