"""What a serving host installs: the extension library (``engram-export extension`` prints a path
OpenVINO loads; a prebuilt library named by ``$ENGRAM_EXPORT_EXTENSION`` is used as it is, with no
cmake on PATH) and the console script (every command starts in a fresh interpreter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import openvino

from tests.helpers import cli, refused, run_cli


def test_extension_command_prints_a_library_openvino_loads():
    path = cli("extension").stdout.strip()
    assert os.path.isfile(path) and path.endswith(".so")
    core = openvino.Core()
    core.add_extension(path)  # raises if the library is not an OpenVINO extension


def test_prebuilt_library_from_the_environment_without_cmake(tmp_path):
    prebuilt = tmp_path / "prebuilt" / "libengram.so"
    prebuilt.parent.mkdir()
    shutil.copy2(cli("extension").stdout.strip(), prebuilt)
    bin_dir = tmp_path / "bin"  # a PATH with python and nothing else: no cmake, no compiler
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    code = ("from engram_export.ov_extension import library_path, openvino_core\n"
            "print(library_path()); print(len(openvino_core().get_available_devices()) > 0)")
    env = {**os.environ, "PATH": str(bin_dir), "ENGRAM_EXPORT_EXTENSION": str(prebuilt),
           "ENGRAM_EXPORT_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(prebuilt), "True"], done.stderr
    assert not (tmp_path / "empty-cache").exists()  # nothing was built


def test_missing_prebuilt_library_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_EXPORT_EXTENSION", str(tmp_path / "nowhere.so"))
    refused(run_cli("extension"), "nowhere.so is not a file")


COMMANDS = ["export", "optimize", "compile", "quantize", "run", "verify", "demo", "bench", "extension"]


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
