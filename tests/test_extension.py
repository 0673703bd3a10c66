"""What a serving host installs: the extension library (``engram-export extension`` prints a path
OpenVINO loads; the wheel carries one built against its pinned OpenVINO; a prebuilt library named by
``$ENGRAM_EXPORT_EXTENSION`` is used as it is; neither needs cmake on PATH) and the console script
(every command starts in a fresh interpreter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import openvino
import pytest

from tests.helpers import cli, refused, run_cli


def test_extension_command_prints_a_library_openvino_loads():
    path = cli("extension").stdout.strip()
    assert os.path.isfile(path) and path.endswith(".so")
    core = openvino.Core()
    core.add_extension(path)  # raises if the library is not an OpenVINO extension


def _python_only_path(tmp_path) -> str:
    """A PATH with python and nothing else: no cmake, no compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    return str(bin_dir)


def test_prebuilt_library_from_the_environment_without_cmake(tmp_path):
    prebuilt = tmp_path / "prebuilt" / "libengram.so"
    prebuilt.parent.mkdir()
    shutil.copy2(cli("extension").stdout.strip(), prebuilt)
    code = (
        "from engram_export.openvino.extension import library_path, openvino_core\n"
        "print(library_path()); print(len(openvino_core().get_available_devices()) > 0)"
    )
    env = {
        **os.environ,
        "PATH": _python_only_path(tmp_path),
        "ENGRAM_EXPORT_EXTENSION": str(prebuilt),
        "ENGRAM_EXPORT_CACHE": str(tmp_path / "empty-cache"),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(prebuilt), "True"], done.stderr
    assert not (tmp_path / "empty-cache").exists()  # nothing was built


@pytest.mark.slow
def test_the_wheel_carries_the_extension_built_against_its_openvino(tmp_path):
    """``pip wheel .`` (scikit-build-core; cmake and the pinned openvino come from the package index)
    makes one platform wheel with the library inside; unpacked elsewhere, the package loads that library
    with no cmake or compiler on PATH and nothing built."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    package = site / "engram_export"
    assert (package / "models" / "config.py").is_file() and (package / "passes" / "_graph.py").is_file()
    extension = package / "openvino" / "extension"
    assert (extension / "openvino_version.txt").read_text() == openvino.__version__
    # the unpacked wheel first on sys.path; an editable install of this checkout redirects imports of
    # engram_export to it through a finder of its own, so that finder is dropped
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "sys.meta_path = [f for f in sys.meta_path if 'Redirect' not in type(f).__name__]\n"
        "from engram_export.openvino.extension import library_path, openvino_core\n"
        "print(library_path()); print(len(openvino_core().get_available_devices()) > 0)"
    )
    env = {**os.environ, "PATH": _python_only_path(tmp_path), "ENGRAM_EXPORT_CACHE": str(tmp_path / "empty-cache")}
    env.pop("ENGRAM_EXPORT_EXTENSION", None)
    done = subprocess.run(
        [sys.executable, "-c", code, str(site)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(extension / "libengram_ov_extension.so"), "True"]
    assert not (tmp_path / "empty-cache").exists()  # nothing was built


def test_a_packaged_library_is_used_only_with_the_openvino_it_was_built_against(tmp_path, monkeypatch, caplog):
    from engram_export.openvino import extension as ov_extension

    monkeypatch.setattr(ov_extension, "SOURCE_DIR", tmp_path)
    assert ov_extension._packaged() is None  # a checkout: nothing packaged
    (tmp_path / "libengram_ov_extension.so").write_bytes(b"")
    (tmp_path / "openvino_version.txt").write_text(openvino.__version__)
    assert ov_extension._packaged() == tmp_path / "libengram_ov_extension.so"
    (tmp_path / "openvino_version.txt").write_text("2025.0.0-1-other")
    assert ov_extension._packaged() is None
    assert "built against openvino 2025.0.0-1-other" in caplog.text


def test_missing_prebuilt_library_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_EXPORT_EXTENSION", str(tmp_path / "nowhere.so"))
    refused(run_cli("extension"), "nowhere.so is not a file")


COMMANDS = [
    "export",
    "optimize",
    "compile",
    "quantize",
    "calibrate",
    "serve-tables",
    "run",
    "verify",
    "demo",
    "bench",
    "extension",
]


def test_every_command_starts_through_the_installed_entry_point():
    """One subprocess per command through the console script (the in-process CLI tests do the work):
    the entry point, its imports and each command's arguments load in a fresh interpreter."""
    script = shutil.which("engram-export", path=os.path.dirname(sys.executable))
    assert script, "the engram-export console script is not installed beside this Python"
    for command in COMMANDS:
        done = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"usage: engram-export {command}" in done.stdout, (command, done.stderr)


def test_the_smoke_test_covers_every_command():
    import argparse

    from engram_export.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(COMMANDS)
