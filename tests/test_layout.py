"""The package's shape: no module imports one that imports it back (lazy imports inside functions
count too), none imports above its level but through a hand-off made inside a function, nothing but the
entry point imports the CLI, the two top-level folders are the package's ``models`` and ``passes``, the
top-level names are imported lazily, and a runtime on OpenVINO loads neither ONNX Runtime nor the
PyTorch drop-in."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engram_export

ROOT = Path(__file__).parents[1]


def _nodes(tree: ast.AST, eager: bool):
    """Every node of ``tree``; with ``eager``, only those that run when the module is imported (not
    the bodies of functions)."""
    if not eager:
        yield from ast.walk(tree)
        return
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield node
            yield from _nodes(node, eager)


def _imports(eager: bool = False) -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its code, or with ``eager`` only when it
    is imported (the package itself left out: importing any submodule runs ``engram_export/__init__.py``
    first, which is not a cycle of code)."""
    found = {}
    paths = [
        Path(folder) / file
        for folder, _, files in os.walk(ROOT / "engram_export", followlinks=True)
        for file in files
        if file.endswith(".py")
    ]  # models/ and passes/ through their links
    for path in paths:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in _nodes(ast.parse(path.read_text()), eager):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engram_export"):
                deps |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("engram_export")}
        found[name] = deps
    modules = set(found) - {"engram_export"}
    return {name: {d for d in deps if d in modules and d != name} for name, deps in found.items() if name in modules}


def test_no_import_cycles():
    graph = _imports()
    assert "engram_export.runtime" in graph and "engram_export.models.engram" in graph

    def reaches(start: str, target: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt == target:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    cycles = sorted(name for name in graph if reaches(name, name))
    assert cycles == [], cycles


# A module imports only modules of its own level or lower (lazy imports inside functions count too): a
# file's folder tells its level.
LEVELS = {
    "engram_export.core": 0,  # errors, progress, file I/O, integrity, resources, text, checkpoint headers
    "engram_export.models": 1,  # the families' configs, hashes and PyTorch layers
    "engram_export.passes": 3,  # ONNX graph passes (they know the custom ops of onnx/)
    "engram_export.contract": 2,  # what an exported file says about itself, the inputs it accepts
    "engram_export.onnx": 3,  # export and the custom ops
    "engram_export.openvino": 4,  # compile, quantize, the extension, what the runtime does to an IR
    "engram_export.folders": 5,  # manifests and whole-model folders
    "engram_export.sharding": 5,  # tables served by shards on Ray: the shards, the layout, the client
    "engram_export.runtime": 6,  # EngramRuntime, backends, decode sessions
    "engram_export.runtime.torch": 7,  # the PyTorch drop-in
    "engram_export.measure": 7,  # verify and the benches
    "engram_export.engines": 7,  # the vLLM and SGLang plug-ins on the row API
    "engram_export.cli": 8,  # the command line
}


def _level(module: str) -> int:
    """The level of the longest entry of LEVELS that is ``module`` or a package above it (so
    ``engram_export.runtime.torch`` is 7, not ``engram_export.runtime``'s 6)."""
    prefixes = [prefix for prefix in LEVELS if module == prefix or module.startswith(prefix + ".")]
    if not prefixes:
        raise AssertionError(f"{module} is in no level of LEVELS")
    return LEVELS[max(prefixes, key=len)]


def test_a_module_takes_the_level_of_its_longest_prefix():
    assert _level("engram_export.runtime.torch") == 7
    assert _level("engram_export.runtime.model") == _level("engram_export.runtime") == 6
    with pytest.raises(AssertionError, match="in no level"):
        _level("engram_export.runtimes")  # a prefix counts at a dot only


# The imports allowed to run up the levels: each made inside the function that hands over to the level
# above, never when the module is imported (importer -> imported).
HAND_OFFS = {
    ("engram_export.runtime.model", "engram_export.runtime.torch"),  # LayerRuntime.as_torch: the drop-in
}


def test_no_import_runs_up_the_levels():
    imports, eager = _imports(), _imports(eager=True)
    upward = sorted(
        f"{name} -> {dep}"
        for name, deps in imports.items()
        for dep in deps
        if _level(dep) > _level(name) and (name, dep) not in HAND_OFFS
    )
    assert upward == [], upward
    assert all(dep in imports[name] for name, dep in HAND_OFFS), "a hand-off that no longer is: remove it"
    eager_hand_offs = sorted(f"{name} -> {dep}" for name, dep in HAND_OFFS if dep in eager[name])
    assert eager_hand_offs == [], eager_hand_offs


def test_nothing_imports_the_cli():
    users = sorted(name for name, deps in _imports().items() if "engram_export.cli" in deps)
    assert users == ["engram_export.cli.__main__"], users


def test_models_and_passes_are_the_packages_own():
    for name in ("models", "passes"):
        link = ROOT / "engram_export" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_the_top_level_names_are_lazy_and_real():
    """``import engram_export`` loads no heavy library; each public name is the object its module has."""
    code = "import engram_export, sys; print(sorted({'torch', 'openvino', 'onnxruntime', 'nncf'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    for name in engram_export.__all__:
        value = getattr(engram_export, name)
        assert getattr(importlib.import_module(value.__module__), name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'compile'"):
        _ = engram_export.compile  # the 0.1 layout's module paths are gone
    assert not (ROOT / "engram_export" / "compile.py").exists()


def test_tests_share_helpers_through_helper_modules_only():
    """Shared test code lives in helper modules (``tests/helpers.py``, ``tests/v41_spec.py``), never in a
    test file or conftest another file imports."""
    imported = {
        (path.name, node.module)
        for path in (ROOT / "tests").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("tests.")
        and node.module.split(".")[1].startswith(("test_", "conftest"))
    }
    assert imported == set(), imported


# Load an IR, run it once, and print which of these the process loaded.
_RUN_AN_IR = """
import json, sys
import numpy as np
from engram_export import EngramRuntime
rt = EngramRuntime(sys.argv[1])
ids = np.zeros((2, 3), np.int64)
hidden = np.ones((2, 3, rt.config.hc_mult, rt.config.hidden_size), np.float32)
assert rt(ids, hidden).shape == hidden.shape
print(json.dumps(sorted({"torch", "onnxruntime", "engram_export.runtime.torch"} & set(sys.modules))))
"""


@pytest.fixture(scope="module")
def loaded_by_an_openvino_runtime(tiny_files) -> set[str]:
    """What a process that loads and calls an ``EngramRuntime`` over the tiny IR has imported."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AN_IR, str(tiny_files["f32"])], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_an_openvino_runtime_loads_neither_onnx_runtime_nor_the_torch_drop_in(loaded_by_an_openvino_runtime):
    assert loaded_by_an_openvino_runtime & {"onnxruntime", "engram_export.runtime.torch"} == set()


def test_an_openvino_runtime_loads_no_pytorch(loaded_by_an_openvino_runtime):
    assert "torch" not in loaded_by_an_openvino_runtime
