"""The ``engram-export`` command line, in-process (``tests/helpers.py``); one subprocess run proves the
installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram_export.measure.common import precision_label
from engram_export.measure.verify import compare, random_inputs
from tests.helpers import TINY_LAYER, cli, refused


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def checkpoint(tiny_layer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "engram.safetensors"
    save_file(dict(tiny_layer.state_dict()), path)
    return path


def test_export_compile_run_matches_pytorch(checkpoint, tiny_layer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cli("export", "--config", "tiny", "--weights", checkpoint, "--layer", TINY_LAYER, "-o", out / "engram.onnx")
    cli("compile", out / "engram.onnx", "--precision", "bf16", "-o", out / "engram_bf16.xml")
    cli("compile", out / "engram.onnx", "-o", out / "engram.xml")
    assert leftovers(out) == sorted(["engram.onnx", "engram.xml", "engram.bin", "engram_bf16.xml", "engram_bf16.bin"])
    ids, hidden = random_inputs(tiny_layer.config, tiny_layer.config.vocab_size, 50, 14, seed=9)
    np.savez(tmp_path / "in.npz", input_ids=ids, hidden_states=hidden)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    for model, runtime, precision in [
        ("engram.xml", "ov", "f32"),
        ("engram.onnx", "ort", "f32"),
        ("engram.onnx", "ov", "f32"),
        ("engram_bf16.xml", "ov", "bf16"),
    ]:
        result = tmp_path / f"{model}.{runtime}.npz"
        cli("run", out / model, "--inputs", tmp_path / "in.npz", "-o", result, "--runtime", runtime)
        output = np.load(result)["output"]
        assert compare(model, reference, output, precision).passed


def test_verify_prints_every_path(checkpoint):
    done = cli(
        "verify",
        "--config",
        "tiny",
        "--weights",
        checkpoint,
        "--layer",
        TINY_LAYER,
        "--shape",
        "50x14",
        "--shape",
        "1x1",
    )
    for path in ("onnxruntime f32", "openvino f32", "openvino bf16", "pytorch (demo layout)"):
        assert done.stdout.count(path) == 2, done.stdout
    assert "max_rel" in done.stdout and "min_cos" in done.stdout
    assert "8 passed, 0 failed" in done.stdout


def test_demo_runs_with_a_small_table():
    done = cli("demo", "--engram-vocab-size", "3001")
    assert "demo passed" in done.stdout
    assert "openvino bf16" in done.stdout


def test_bad_cli_inputs(checkpoint, tmp_path, tiny_files):
    refused(
        cli(
            "export",
            "--config",
            "tiny",
            "--weights",
            checkpoint,
            "--layer",
            TINY_LAYER,
            "-o",
            tmp_path / "missing" / "e.onnx",
            check=False,
        ),
        "output folder",
    )
    refused(
        cli(
            "export", "--config", "tiny", "--weights", checkpoint, "--layer", 2, "-o", tmp_path / "e.onnx", check=False
        ),
        "layer 2 is not an Engram layer",
    )
    config = json.loads((Path(__file__).parents[1] / "models/presets/tiny.json").read_text())
    del config["hc_mult"]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    refused(
        cli(
            "export",
            "--config",
            tmp_path / "bad.json",
            "--random-init",
            "--layer",
            1,
            "-o",
            tmp_path / "e.onnx",
            check=False,
        ),
        "missing field(s) hc_mult",
    )
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    refused(
        cli(
            "export",
            "--config",
            "tiny",
            "--weights",
            truncated,
            "--layer",
            TINY_LAYER,
            "-o",
            tmp_path / "e.onnx",
            check=False,
        ),
        "not a readable safetensors",
    )
    refused(
        cli(
            "export",
            "--config",
            "deepseek-demo",
            "--weights",
            checkpoint,
            "--layer",
            1,
            "-o",
            tmp_path / "e.onnx",
            check=False,
        ),
        "has shape",
    )
    refused(cli("compile", tiny_files["onnx"], "-o", tmp_path / "nope" / "m.xml", check=False), "output folder")
    assert leftovers(tmp_path) == ["bad.json", "trunc.safetensors"]


@pytest.mark.parametrize(
    "inputs,message",
    [
        (lambda ids, h: dict(input_ids=ids + 5000, hidden_states=h), "out of range [0, 5000)"),
        (lambda ids, h: dict(input_ids=ids[0], hidden_states=h), "input_ids must be [batch, tokens]"),
        (lambda ids, h: dict(input_ids=ids, hidden_states=h.astype(np.float16)), "must be float32"),
        (lambda ids, h: dict(input_ids=ids, hidden_states=h[:, :, :2]), "got [2, 3, 2, 48]"),
        (lambda ids, h: dict(input_ids=ids[:, :0], hidden_states=h[:, :0]), "input_ids is empty"),
        (lambda ids, h: dict(input_ids=ids), "has no hidden_states"),
    ],
)
def test_run_refuses_bad_inputs(tiny_files, tmp_path, inputs, message):
    ids, hidden = random_inputs(load_tiny(), 5000, 2, 3)
    np.savez(tmp_path / "in.npz", **inputs(ids, hidden))
    refused(
        cli("run", tiny_files["f32"], "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz", check=False), message
    )
    assert leftovers(tmp_path) == ["in.npz"]


def test_run_refuses_corrupt_inputs_and_models(tiny_files, tmp_path):
    (tmp_path / "in.npz").write_bytes(b"not a zip")
    refused(
        cli("run", tiny_files["f32"], "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz", check=False),
        "not a readable .npz",
    )
    ids, hidden = random_inputs(load_tiny(), 5000, 2, 3)
    np.savez(tmp_path / "ok.npz", input_ids=ids, hidden_states=hidden)
    refused(
        cli("run", tmp_path / "none.xml", "--inputs", tmp_path / "ok.npz", "-o", tmp_path / "o.npz", check=False),
        "does not exist",
    )
    refused(
        cli(
            "run",
            tiny_files["f32"],
            "--runtime",
            "ort",
            "--inputs",
            tmp_path / "ok.npz",
            "-o",
            tmp_path / "o.npz",
            check=False,
        ),
        "ONNX Runtime runs .onnx files",
    )
    assert leftovers(tmp_path) == ["in.npz", "ok.npz"]


def load_tiny():
    from engram_export.models.config import load_config

    return load_config("tiny")


def test_help_is_fast_and_lists_commands():
    """The one subprocess run: the module entry point, as the installed script calls it."""
    done = subprocess.run(
        [sys.executable, "-m", "engram_export.cli", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 0, done.stderr
    for command in ("export", "compile", "run", "verify", "demo"):
        assert command in done.stdout


def test_shared_flags_go_before_or_after_the_command(tiny_files, tmp_path, capsys):
    """-q and --debug come from one parent parser: accepted on either side of the command, and a value
    that looks like one (``--prefix=-q``) stays a value."""
    from engram_export.cli import build_parser, main

    for argv in (["-q", "extension"], ["extension", "-q"], ["--debug", "extension", "--quiet"]):
        assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(".so")
    args = build_parser().parse_args(["export", "--config", "tiny", "--random-init", "--prefix=-q", "-o", "x.onnx"])
    assert args.prefix == "-q" and not getattr(args, "quiet", False)
    assert build_parser().parse_args(["compile", "m.onnx", "-o", "m.xml", "-q"]).quiet


def test_optimize_prints_node_counts(tiny_raw_files, tmp_path):
    done = cli("optimize", tiny_raw_files["onnx"], "-o", tmp_path / "opt.onnx")
    assert "nodes: 90 -> 28" in done.stdout and "MatMul" in done.stdout
    again = cli("optimize", tmp_path / "opt.onnx", "-o", tmp_path / "opt2.onnx")
    assert "(nothing to fuse)" in again.stdout


@pytest.mark.slow
def test_bench_prints_every_row():
    done = cli("bench", "layer", "--config", "tiny", "--batch", "2", "--tokens", "3", "--repeat", "2", "--warmup", "1")
    for row in (
        "pytorch eager (demo layout) f32",
        "pytorch eager (demo layout) bf16",
        "onnxruntime raw f32",
        "onnxruntime optimized f32",
        "openvino raw f32",
        "openvino optimized f32",
        "openvino matmul floor f32",
        "openvino optimized bf16",
        "openvino matmul floor bf16",
    ):
        assert row in done.stdout, row
    assert "CPU:" in done.stdout and ("AMX present" in done.stdout or "no AMX" in done.stdout)
    assert "lookup alone" in done.stdout and "table_memory" in done.stdout  # the lookup tables, at the config's size
    # the OpenVINO bf16 rows name what ran: "bf16 (runs f32 here)" on a CPU without BF16 kernels
    assert f"openvino optimized {precision_label('bf16')}  " in done.stdout
    assert "onnxruntime raw f32  " in done.stdout and "openvino optimized f32  " in done.stdout  # f32 ran as f32
