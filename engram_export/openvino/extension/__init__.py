"""The OpenVINO extension (C++): the bit-exact Engram hash, the fused gated short conv, the row kernel.

Where the library comes from, first match wins:
1. ``$ENGRAM_EXPORT_EXTENSION``, when set: a prebuilt library (a serving image that ships one, built
   against the same OpenVINO release);
2. the one built into the wheel (``pip install .`` or a wheel: CMake ran at build time against the
   pinned ``openvino``), used when the installed OpenVINO is the release it was built against;
3. otherwise (an editable install, a source checkout, another OpenVINO) it is compiled on first use with
   CMake against the headers and CMake config that ship in the ``openvino`` wheel, once per OpenVINO
   version and source revision, into ``$ENGRAM_EXPORT_CACHE`` (default ``~/.cache/engram-export``). Every
OpenVINO entry point of this package loads it through ``openvino_core()``, so users never pass an
extension path by hand; ``engram-export extension`` prints the path for servers that take one (OpenVINO
Model Server's ``--cpu_extension``, Triton's ``CPU_EXTENSION_PATH``, OpenVINO GenAI's ``extensions``).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import openvino
from openvino.utils.node_factory import NodeFactory

from engram_export.core import progress
from engram_export.core.errors import EngramError

__all__ = ["library_path", "openvino_core", "make_node", "HASH_OP_TYPE"]

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent
HASH_OP_TYPE = "EngramHash"
_LIBRARY = "libengram_ov_extension.so"
_BUILT_AGAINST = "openvino_version.txt"  # written beside the wheel's library by CMakeLists.txt


def _cache_dir() -> Path:

    sources = b"".join(
        path.read_bytes()
        for path in sorted(SOURCE_DIR.iterdir())
        if path.name == "CMakeLists.txt" or path.suffix in (".cpp", ".hpp")
    )
    key = hashlib.sha256(sources + openvino.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("ENGRAM_EXPORT_CACHE", Path.home() / ".cache" / "engram-export"))
    return root / f"ov-extension-{key}"


def _build(target: Path) -> None:

    cmake = shutil.which("cmake")
    if cmake is None:
        raise EngramError("building the OpenVINO extension needs cmake and a C++17 compiler on PATH")
    ov_cmake_dir = Path(openvino.__file__).parent / "cmake"
    with (
        progress.stage(f"building the OpenVINO extension (once) into {target.parent}"),
        tempfile.TemporaryDirectory(prefix="engram-ov-build-") as build,
    ):
        for step in (
            [cmake, "-S", str(SOURCE_DIR), "-B", build, f"-DOpenVINO_DIR={ov_cmake_dir}"],
            [cmake, "--build", build, "-j", str(os.cpu_count() or 1)],
        ):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise EngramError(
                    f"building the OpenVINO extension failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
                )
        staged = target.with_suffix(".tmp")
        shutil.copy2(Path(build) / _LIBRARY, staged)
        os.replace(staged, target)


def _packaged() -> Path | None:
    """The wheel's library, if there is one and this OpenVINO is the release it was built against."""
    library, stamp = SOURCE_DIR / _LIBRARY, SOURCE_DIR / _BUILT_AGAINST
    if not (library.is_file() and stamp.is_file()):
        return None
    built_against = stamp.read_text().strip()
    if built_against == openvino.__version__:
        return library
    log.warning(
        "the packaged OpenVINO extension was built against openvino %s, this is %s: building one for it",
        built_against,
        openvino.__version__,
    )
    return None


def library_path() -> Path:
    """Path of the extension: ``$ENGRAM_EXPORT_EXTENSION`` if set, else the wheel's, else the compiled
    one, built first if this OpenVINO has none yet."""
    prebuilt = os.environ.get("ENGRAM_EXPORT_EXTENSION")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise EngramError(
                f"ENGRAM_EXPORT_EXTENSION={prebuilt} is not a file (unset it to build the extension here)"
            )
        return Path(prebuilt)
    packaged = _packaged()
    if packaged is not None:
        return packaged
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


def check_struct(library, path: str, symbols: tuple[str, str], expected: tuple[int, int], what: str, mirror: str):
    """Refuse a library (at ``path``) whose struct ``what`` is not the ctypes copy in ``mirror``: the
    library's layout version and struct size (its functions ``symbols``) must be ``expected``, else a
    call through the copy would read the struct's fields from the wrong bytes."""
    version, size = (getattr(library, symbol, None) for symbol in symbols)
    if version is None or size is None:
        raise EngramError(f"{path} has no {what} version (built before it had one): rebuild it or reinstall")
    version.restype, size.restype = ctypes.c_uint32, ctypes.c_size_t
    found = (int(version()), int(size()))
    if found != expected:
        raise EngramError(
            f"{path} has {what} version {found[0]} ({found[1]} bytes), {mirror} version "
            f"{expected[0]} ({expected[1]} bytes): rebuild the extension or reinstall"
        )


@cache
def openvino_core():
    """The process's ``openvino.Core`` with the Engram extension loaded."""
    core, path = openvino.Core(), library_path()
    try:
        core.add_extension(str(path))
    except RuntimeError as exc:  # e.g. a prebuilt library made for another OpenVINO release
        raise EngramError(f"OpenVINO cannot load the extension {path}: {str(exc).splitlines()[0]}") from exc
    return core


@cache
def _node_factory():
    """OpenVINO's ``NodeFactory`` with the extension's ops (as openvino-tokenizers builds its nodes); kept
    for the process, so the library stays loaded under every node it made."""
    factory = NodeFactory()
    factory.add_extension(str(library_path()))
    return factory


def make_node(type_name: str, inputs: list, attributes: dict):
    """A new node of one of the extension's ops over ``inputs`` (``openvino.Output``s). ``attributes``
    take Python values: numbers, strings, lists for vectors, and an element type as its name (``"bf16"``)
    or an ``openvino.Type``; the op checks them and infers its output type and shape. The node is named
    after its op (as profiles list it)."""
    node = _node_factory().create(type_name, inputs, attributes)
    node.set_friendly_name(type_name)
    return node
