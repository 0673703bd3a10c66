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

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from engram_export.core import progress
from engram_export.core.errors import EngramError

__all__ = ["library_path", "openvino_core", "make_node", "HASH_OP_TYPE"]

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent
HASH_OP_TYPE = "EngramHash"
_LIBRARY = "libengram_ov_extension.so"
_BUILT_AGAINST = "openvino_version.txt"  # written beside the wheel's library by CMakeLists.txt


def _cache_dir() -> Path:
    import openvino

    sources = b"".join(
        path.read_bytes()
        for path in sorted(SOURCE_DIR.iterdir())
        if path.name == "CMakeLists.txt" or path.suffix in (".cpp", ".hpp")
    )
    key = hashlib.sha256(sources + openvino.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("ENGRAM_EXPORT_CACHE", Path.home() / ".cache" / "engram-export"))
    return root / f"ov-extension-{key}"


def _build(target: Path) -> None:
    import openvino

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
    import openvino

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


@cache
def openvino_core():
    """The process's ``openvino.Core`` with the Engram extension loaded."""
    import openvino

    core, path = openvino.Core(), library_path()
    try:
        core.add_extension(str(path))
    except RuntimeError as exc:  # e.g. a prebuilt library made for another OpenVINO release
        raise EngramError(f"OpenVINO cannot load the extension {path}: {str(exc).splitlines()[0]}") from exc
    return core


_IR_PRECISIONS = {
    "f32": "FP32",
    "f16": "FP16",
    "bf16": "BF16",
    "i64": "I64",
    "i32": "I32",
    "u8": "U8",
    "boolean": "BOOL",
}


def _port(port_id: int, type_name: str, rank: int) -> str:
    dims = "".join("<dim>-1</dim>" for _ in range(rank))
    return f'<port id="{port_id}" precision="{_IR_PRECISIONS[type_name]}">{dims}</port>'


def make_node(type_name: str, inputs: list, attributes: dict, output_type: str, output_rank: int):
    """A new node of one of the extension's ops over ``inputs`` (``openvino.Output``s).

    OpenVINO's Python API cannot construct a C++ op of an extension, but its IR reader can: the node is
    read from a one-op IR whose parameters then hand their consumers over to ``inputs``."""
    import openvino

    types = [value.get_element_type().get_type_name() for value in inputs]
    ranks = [value.get_partial_shape().rank.get_length() for value in inputs]
    data = " ".join(f'{key}="{value}"' for key, value in attributes.items())
    op_id, result_id = len(inputs), len(inputs) + 1
    layers = [
        f'<layer id="{i}" name="input{i}" type="Parameter" version="opset1">'
        f'<data shape="{",".join("?" * rank) if rank else ""}" element_type="{kind}"/>'
        f"<output>{_port(0, kind, rank)}</output></layer>"
        for i, (kind, rank) in enumerate(zip(types, ranks, strict=True))
    ]
    layers.append(
        f'<layer id="{op_id}" name="{type_name}" type="{type_name}" version="engram_extension">'
        f"<data {data}/><input>{''.join(_port(i, t, r) for i, (t, r) in enumerate(zip(types, ranks, strict=True)))}"
        f"</input><output>{_port(op_id, output_type, output_rank)}</output></layer>"
    )
    layers.append(
        f'<layer id="{result_id}" name="result" type="Result" version="opset1">'
        f"<input>{_port(0, output_type, output_rank)}</input></layer>"
    )
    edges = [f'<edge from-layer="{i}" from-port="0" to-layer="{op_id}" to-port="{i}"/>' for i in range(len(inputs))]
    edges.append(f'<edge from-layer="{op_id}" from-port="{op_id}" to-layer="{result_id}" to-port="0"/>')
    xml = (
        f'<?xml version="1.0"?><net name="{type_name}" version="11"><layers>{"".join(layers)}</layers>'
        f"<edges>{''.join(edges)}</edges></net>"
    )
    template = openvino_core().read_model(xml, openvino.Tensor(openvino.Type.u8, openvino.Shape([0])))
    parameters = {p.get_friendly_name(): p for p in template.get_parameters()}
    (node,) = [op for op in template.get_ops() if op.get_type_name() == type_name]
    for i, value in enumerate(inputs):
        parameters[f"input{i}"].output(0).replace(value)
    node.validate_and_infer_types()
    return node
