"""Output paths the CLI must refuse in one line before any work, leaving nothing behind; staging
folders, the umask, Ctrl-C and the last line of defence in ``main``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engram_export.core.fileio import staged_folder, staged_output
from engram_export.measure.verify import random_inputs
from tests.helpers import STAGING_PREFIX, listing, refused, run_cli

EXPORT = ("export", "--config", "tiny", "--random-init", "--layer", "1")


@pytest.fixture(scope="module")
def inputs(tiny_config, tmp_path_factory) -> Path:
    ids, hidden = random_inputs(tiny_config, tiny_config.vocab_size, 2, 3)
    path = tmp_path_factory.mktemp("inputs") / "in.npz"
    np.savez(path, input_ids=ids, hidden_states=hidden)
    return path


def commands(files, folders, inputs, out: Path) -> dict[str, list]:
    """One argv per command writing ``out`` (a file path for file outputs: the suffix is replaced)."""
    return {
        "export": [*EXPORT, "-o", out.with_suffix(".onnx")],
        "optimize": ["optimize", files["onnx"], "-o", out.with_suffix(".onnx")],
        "compile": ["compile", files["onnx"], "-o", out.with_suffix(".xml")],
        "quantize": ["quantize", files["f32"], "--mode", "int8-weights", "-o", out.with_suffix(".xml")],
        "run": ["run", files["f32"], "--inputs", inputs, "-o", out.with_suffix(".npz")],
        "compile-folder": ["compile", folders["onnx"], "-o", out],
        "export-folder": ["export", "--config", "tiny", "--random-init", "-o", out],
    }


def refused_and_untouched(tmp_path: Path, argv, message: str) -> None:
    before = listing(tmp_path)
    refused(run_cli(*argv), message)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["export", "optimize", "compile", "quantize", "run"])
def test_an_existing_folder_as_output_file(tiny_files, folders, inputs, tmp_path, command):
    argv = commands(tiny_files, folders, inputs, tmp_path / "out")[command]
    argv[-1].mkdir()
    (argv[-1] / "keep").write_text("x")
    refused_and_untouched(tmp_path, argv, "is a folder")


@pytest.mark.parametrize("side", ["out.bin", "out.onnx.data"])
def test_a_folder_where_a_side_file_goes(tiny_files, folders, inputs, tmp_path, side):
    (tmp_path / side).mkdir()
    argv = commands(tiny_files, folders, inputs, tmp_path / "out")["compile" if side == "out.bin" else "export"]
    refused_and_untouched(tmp_path, argv, f"{side} is a folder")


@pytest.mark.parametrize("command", ["compile-folder", "export-folder"])
def test_a_non_empty_folder_or_a_file_as_output_folder(tiny_files, folders, inputs, tmp_path, command):
    argv = commands(tiny_files, folders, inputs, tmp_path / "out")[command]
    argv[-1].write_text("x")
    refused_and_untouched(tmp_path, argv, "exists and is not an empty folder")


@pytest.mark.parametrize(
    "command", ["export", "optimize", "compile", "quantize", "run", "compile-folder", "export-folder"]
)
def test_a_read_only_output_folder(tiny_files, folders, inputs, tmp_path, monkeypatch, command):
    argv = commands(tiny_files, folders, inputs, tmp_path / "out")[command]
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and access(p, mode))
    refused_and_untouched(tmp_path, argv, f"cannot write to {tmp_path} (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_output_folder(tmp_path):
    tmp_path.chmod(0o555)
    try:
        refused_and_untouched(tmp_path, [*EXPORT, "-o", tmp_path / "e.onnx"], "Permission denied")
    finally:
        tmp_path.chmod(0o755)


def test_staging_maps_permission_errors(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    for staged in (staged_output(tmp_path / "x.npz"), staged_folder(tmp_path / "f")):
        with pytest.raises(ValueError, match=f"cannot write to {tmp_path} \\(Permission denied\\)"):
            with staged:
                pass
    assert listing(tmp_path) == []


def test_names_near_the_file_system_limit(tiny_files, tmp_path):
    longest = tmp_path / ("m" * 251 + ".xml")  # 255 bytes, and so is its .bin
    assert run_cli("compile", tiny_files["onnx"], "-o", longest)[0] == 0
    assert listing(tmp_path) == sorted([longest.name, longest.with_suffix(".bin").name])
    refused_and_untouched(
        tmp_path, ["compile", tiny_files["onnx"], "-o", tmp_path / ("m" * 252 + ".xml")], "is longer than the 255 bytes"
    )
    # an .onnx of 255 bytes could not have its external data beside it
    refused_and_untouched(tmp_path, [*EXPORT, "-o", tmp_path / ("e" * 250 + ".onnx")], ".onnx.data is longer")


def test_output_equal_to_an_input(tiny_files, folders, inputs, tmp_path):
    (tmp_path / "in.npz").write_bytes(inputs.read_bytes())
    (tmp_path / "e.onnx").write_bytes(tiny_files["onnx"].read_bytes())
    (tmp_path / "q.bin").symlink_to(tiny_files["f32"].with_suffix(".bin"))  # -o q.xml writes q.bin
    for argv in (
        ["optimize", tmp_path / "e.onnx", "-o", tmp_path / "e.onnx"],
        ["run", tiny_files["f32"], "--inputs", tmp_path / "in.npz", "-o", tmp_path / "in.npz"],
        ["quantize", tiny_files["f32"], "--mode", "int8-weights", "-o", tiny_files["f32"]],
        ["quantize", tiny_files["f32"], "--mode", "int8-weights", "-o", tmp_path / "q.xml"],
        ["compile", folders["onnx"], "-o", folders["onnx"]],
        ["quantize", folders["f32"], "--mode", "int8-weights", "-o", folders["f32"]],
    ):
        refused_and_untouched(tmp_path, argv, "would overwrite an input")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    refused_and_untouched(
        tmp_path, ["export", "--config", "tiny", "--weights", weights, "-o", weights], "would overwrite an input"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "layer", "--config", "tiny", "--batch", "0", "--tokens", "1"], "--batch must be >= 1, got 0"),
        (["bench", "layer", "--config", "tiny", "--batch", "2", "--tokens", "-3"], "--tokens must be >= 1, got -3"),
        (["bench", "layer", "--config", "tiny", "--repeat", "0"], "--repeat must be >= 1"),
        (["bench", "lookup", "--config", "tiny", "--warmup", "-1"], "--warmup must be >= 0"),
        (["bench", "decode", "--config", "tiny", "--engram-vocab-size", "0"], "--engram-vocab-size must be >= 1"),
        (["demo", "--engram-vocab-size", "0"], "--engram-vocab-size must be >= 1"),
        (["demo", "--engram-vocab-size", "-5"], "--engram-vocab-size must be >= 1"),
    ],
)
def test_zero_and_negative_counts(argv, message):
    refused(run_cli(*argv), message)


@pytest.mark.parametrize("flag", ["--group-size", "--subset-size"])
def test_zero_quantize_sizes(tiny_files, tmp_path, flag):
    refused_and_untouched(
        tmp_path,
        ["quantize", tiny_files["f32"], "--mode", "int4-weights", flag, "0", "-o", tmp_path / "q.xml"],
        f"{flag} must be >= 1",
    )


def test_a_npy_named_npz(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", np.zeros(3, np.float32))
    (tmp_path / "in.npy").rename(tmp_path / "in.npz")
    refused_and_untouched(
        tmp_path,
        ["run", tiny_files["f32"], "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz"],
        "is not an .npz archive",
    )


def test_stale_staging_folders_of_dead_processes_are_removed(tiny_files, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{STAGING_PREFIX}{dead.pid}-0000"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-0000"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "partial.onnx").write_text("x")
    assert run_cli("compile", tiny_files["onnx"], "-o", tmp_path / "c.xml")[0] == 0
    assert listing(tmp_path) == sorted(["c.xml", "c.bin", live.name, f"{live.name}/partial.onnx"])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tiny_files, tiny_raw_files, folders, tmp_path, umask):
    """Every kind of output (an .onnx, its external data, an IR, a folder with its manifest) gets the
    modes a plain file or folder made under the caller's umask gets (staging folders are private)."""
    from engram_export.onnx.files import load_onnx, save_onnx

    old = os.umask(umask)
    try:
        assert run_cli("optimize", tiny_raw_files["onnx"], "-o", tmp_path / "o.onnx")[0] == 0
        save_onnx(load_onnx(tiny_files["onnx"]), tmp_path / "e.onnx", external_data_threshold=1000)
        assert run_cli("compile", tiny_files["onnx"], "-o", tmp_path / "c.xml")[0] == 0
        assert run_cli("compile", folders["onnx"], "-o", tmp_path / "f")[0] == 0
    finally:
        os.umask(old)
    files = ["o.onnx", "e.onnx", "e.onnx.data", "c.xml", "c.bin", "f/manifest.json", "f/layer_1.xml", "f/layer_1.bin"]
    assert {f: oct(os.stat(tmp_path / f).st_mode & 0o777) for f in files} == {f: oct(0o666 & ~umask) for f in files}
    assert oct(os.stat(tmp_path / "f").st_mode & 0o777) == oct(0o777 & ~umask)


def test_unexpected_errors_are_one_line(tmp_path, monkeypatch):
    import engram_export.onnx.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(export, "trace", broken)
    code, out, err = run_cli(*EXPORT, "-o", tmp_path / "e.onnx")
    assert (code, err) == (
        1,
        "engram-export: error: export failed: RuntimeError: kaput (run with --debug for the trace)\n",
    )
    code, out, err = run_cli("--debug", *EXPORT, "-o", tmp_path / "e.onnx")
    assert code == 1 and "Traceback" in err and err.endswith("(run with --debug for the trace)\n")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "e.onnx"))

    monkeypatch.setattr(export, "trace", full)
    refused(run_cli(*EXPORT, "-o", tmp_path / "e.onnx"), f"{tmp_path / 'e.onnx'}: No space left on device")
    assert listing(tmp_path) == []


def test_an_unavailable_resource_exits_3(monkeypatch):
    """A cluster address where nothing listens is not the user's mistake (exit 2) but a resource not there
    now: one line, exit 3. A stand-in for the ray module (a process joined to no cluster) keeps Ray out."""
    import types

    from engram_export.core.errors import EngramError, EngramUnavailable
    from engram_export.sharding import cluster

    monkeypatch.setattr(cluster, "_ray", lambda: types.SimpleNamespace(is_initialized=lambda: False))
    code, out, err = run_cli("serve-tables", "--stop", "--name", "x", "--address", "127.0.0.1:1")
    assert (code, out) == (3, ""), (code, err)
    assert err.startswith("engram-export: error: cannot reach a Ray cluster at '127.0.0.1:1': "), err
    assert err.count("\n") == 1, err
    with pytest.raises(EngramUnavailable) as raised:
        cluster.connect("127.0.0.1:1")
    assert isinstance(raised.value, EngramError)  # one ``except EngramError`` still catches it


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path):
    """A real SIGINT during a demo whose table takes a while to build and export."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # SIGINT back to its default in the child: a suite started in the background (`pytest &`) has it
    # ignored, and Python then keeps ignoring it
    process = subprocess.Popen(
        [sys.executable, "-m", "engram_export.cli", "demo", "--engram-vocab-size", "200000", "--workdir", tmp_path],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in process.stderr:  # progress lines: interrupt once the export has started writing
        lines.append(line)
        if "writing engram.onnx" in line or "converting" in line:
            break
    else:
        pytest.fail("".join(lines))
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, rest
    assert rest.strip().splitlines()[-1] == "engram-export: interrupted" and "Traceback" not in rest, rest
    assert not any(name.startswith(STAGING_PREFIX) for name in os.listdir(tmp_path)), listing(tmp_path)
    assert not (tmp_path / "engram_f32.xml").exists()
