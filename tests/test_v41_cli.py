"""The commands of the DeepSeek-V4.1 issue, in-process, on a tiny synthetic checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from engram_export.folders.manifest import read_manifest
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.common import precision_label
from tests.helpers import listing, refused, run_cli
from tests.v41_spec import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_v41_checkpoint(tmp_path_factory.mktemp("v41cli") / "checkpoint", TINY, tokenizer=True)


def ok(*args) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


def test_the_issue_commands(checkpoint, tmp_path):
    ok("export", "--checkpoint", checkpoint, "-o", tmp_path / "v41")
    ok("export", "--checkpoint", checkpoint, "--layer", 3, "-o", tmp_path / "v41_l3.onnx")
    ok("compile", tmp_path / "v41", "--precision", "bf16", "-o", tmp_path / "v41_bf16")
    ok("quantize", tmp_path / "v41", "--mode", "int8-weights", "-o", tmp_path / "v41_int8")
    assert read_manifest(tmp_path / "v41_int8").quantization == "int8-weights"
    assert read_manifest(tmp_path / "v41").config.model_type == "deepseek_v41"
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(0, 5000, (2, 6)), rng.random((2, 6)) > 0.3
    hidden = rng.normal(size=(2, 6, 4, 48)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input_ids=ids, hidden_states=hidden, token_mask=mask)
    for model in ("v41_bf16", "v41_int8"):
        ok("run", tmp_path / model, "--layer", 3, "--inputs", tmp_path / "in.npz", "-o", tmp_path / f"{model}.npz")
        output = np.load(tmp_path / f"{model}.npz")["output"]
        np.testing.assert_array_equal(output[~mask], hidden[~mask])
    ok("run", tmp_path / "v41_l3.onnx", "--runtime", "ort", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "ort.npz")
    np.testing.assert_allclose(
        np.load(tmp_path / "ort.npz")["output"], np.load(tmp_path / "v41_bf16.npz")["output"], rtol=1e-2, atol=1e-2
    )


def test_verify_and_bench(checkpoint):
    out = ok("verify", "--checkpoint", checkpoint, "--layer", 1, "--shape", "50x14", "--shape", "1x1")
    assert "6 passed, 0 failed" in out and "image tokens == h" in out
    out = ok("bench", "layer", "--config", "v41-tiny", "--batch", 2, "--tokens", 3, "--repeat", 2)
    for row in (
        "export",
        "compile bf16",
        "load bf16 folder",
        "MatMul floor bf16",
        "fuse / floor",
        "MatMul, FP8 weights",
        "1x1",
        "decode, layer 3, int8-weights",
        "int8-weights fuse faster than bf16 at 1x1 >= 1.8x:",
        "int8-weights decode step / stateless [B,1] call <= 1.3",
    ):
        assert row in out, row
    out = ok("bench", "decode", "--config", "v41-tiny", "--repeat", 2, "--modes", "none")
    assert "decode, layer 3, bf16" in out and "fuse / floor" not in out
    assert f"decode, layer 3, {precision_label('bf16')}: median" in out  # what ran, on a CPU without BF16 too


def test_random_init_preset(tmp_path):
    ok("export", "--config", "v41-tiny", "--random-init", "-o", tmp_path / "r")
    assert sorted(read_manifest(tmp_path / "r").layers) == [1, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch checkpoint left


@pytest.mark.parametrize(
    "args,message",
    [
        (["export", "--checkpoint", "{ck}", "--config", "tiny", "-o", "{out}/x"], "drop --config"),
        (["export", "--config", "v41-tiny", "--weights", "{ck}/config.json", "-o", "{out}/x"], "from their checkpoint"),
        (["export", "--checkpoint", "{out}", "-o", "{out}/x"], "has no config.json"),
        (["export", "--checkpoint", "{ck}", "--layer", 2, "-o", "{out}/x.onnx"], "layer 2 is not an Engram layer"),
        (["verify", "--checkpoint", "{ck}", "-o", "{out}/x"], "unrecognized arguments"),
        (["verify", "--checkpoint", "{ck}"], "give --layer"),
        (["bench", "lookup", "--config", "v41-tiny"], "bench lookup takes a demo-family --config"),
        (
            ["bench", "layer", "--config", "v41-tiny", "--engram-vocab-size", 9],
            "drop --weights and --engram-vocab-size",
        ),
    ],
)
def test_refusals(checkpoint, tmp_path, args, message):
    before = listing(tmp_path)
    code, out, err = run_cli(*[str(a).format(ck=checkpoint, out=tmp_path) for a in args])
    if message == "unrecognized arguments":
        assert code == 2 and message in err
    else:
        refused((code, out, err), message)
    assert listing(tmp_path) == before
