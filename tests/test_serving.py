"""Every layer of a model in one folder (manifest), and prefetching the lookups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.folders.manifest import read_manifest
from engram_export.measure.verify import checked_as, compare, random_inputs
from engram_export.runtime import EngramRuntime
from tests.helpers import cli, refused


def reference(layer, ids, hidden):
    with torch.inference_mode():
        return layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()


def test_folder_has_every_layer_and_a_manifest(folders, tiny_config):
    manifest = read_manifest(folders["f32"])
    assert sorted(manifest.layers) == list(tiny_config.layer_ids)
    assert manifest.kind == "openvino" and manifest.precision == "f32"
    assert set(manifest.files) == {"layer_1.xml", "layer_1.bin", "layer_3.xml", "layer_3.bin"}
    assert all(set(entry) == {"size", "sampled_sha256", "sha256"} for entry in manifest.files.values())
    assert read_manifest(folders["onnx"]).source == "random-init seed 5"


@pytest.mark.parametrize("kind", ["onnx", "f32", "bf16"])
def test_every_layer_matches_pytorch(folders, layers, kind):
    runtime = EngramRuntime(folders[kind])
    assert runtime.layer_ids == [1, 3]
    for layer_id, layer in layers.items():
        ids, hidden = random_inputs(layer.config, 5000, 50, 14, seed=layer_id)
        served = runtime.layer(layer_id)
        result = compare(kind, reference(layer, ids, hidden), served(ids, hidden), checked_as(served))
        assert result.passed, result


def test_a_runtime_is_a_mapping_of_its_layers(folders, layers):
    """rt[L] is layer L's LayerRuntime, with its own call, lookup, prefetch and fuse; the folder's runtime
    prefetches and decodes over all of them, and refuses what only one layer can do."""
    from engram_export.runtime import LayerRuntime

    runtime = EngramRuntime(folders["f32"])
    assert len(runtime) == 2 and list(runtime) == [1, 3] and 3 in runtime and 2 not in runtime
    assert all(isinstance(layer, LayerRuntime) for layer in runtime.values())
    assert runtime[3] is runtime.layer(3) and dict(runtime.items())[1] is runtime[1]
    assert runtime.get(2) is None
    with pytest.raises(EngramError, match=r"no Engram layer 2 here \(layers: \[1, 3\]\)$"):
        runtime[2]
    with pytest.raises(EngramError, match=r"serves layers \[1, 3\]: use rt\[L\]"):
        runtime(*random_inputs(layers[1].config, 5000, 1, 2))
    ids, hidden = random_inputs(layers[3].config, 5000, 2, 5, seed=4)
    expected = runtime[3](ids, hidden)
    compare_to = reference(layers[3], ids, hidden)
    assert compare("f32", compare_to, expected).passed
    one = runtime[3].prefetch(ids)  # one layer's own lookup
    with pytest.raises(EngramError, match="not made by this runtime for layer 1"):
        runtime[1].fuse(one, hidden)
    np.testing.assert_array_equal(runtime[3].fuse(one, hidden), expected)
    np.testing.assert_array_equal(runtime[3].lookup(ids), EngramRuntime(folders["f32"] / "layer_3.xml").lookup(ids))
    step = runtime[3].session(2).prefill(ids, hidden)
    np.testing.assert_array_equal(step[3], expected)


def test_profile_lists_the_nodes_of_both_stages(folders, layers):
    ids, hidden = random_inputs(layers[3].config, 5000, 2, 5, seed=4)
    with pytest.raises(EngramError, match="PERF_COUNT"):
        EngramRuntime(folders["f32"])[3].profile(ids, hidden)
    layer = EngramRuntime(folders["f32"], ov_config={"PERF_COUNT": True})[3]
    with pytest.raises(EngramError, match="rounds must be a positive integer"):
        layer.profile(ids, hidden, rounds=0)
    nodes = layer.profile(ids, hidden, rounds=2, warmup=1)
    assert {n["stage"] for n in nodes} == {"lookup", "fuse"}
    assert {"EngramGatherRows", "output"} <= {n["name"] for n in nodes}  # the row kernel, the fused kernel
    assert all(n["ms"] >= 0 for n in nodes) and [n["ms"] for n in nodes] == sorted(
        (n["ms"] for n in nodes), reverse=True
    )
    np.testing.assert_array_equal(layer(ids, hidden), EngramRuntime(folders["f32"])[3](ids, hidden))


@pytest.mark.parametrize("batch,tokens", [(4, 9), (50, 14), (1, 1)])
def test_prefetch_equals_the_one_shot_call(folders, layers, batch, tokens):
    runtime = EngramRuntime(folders["f32"])
    ids, hidden = random_inputs(layers[1].config, 5000, batch, tokens, seed=11)
    expected = {layer: runtime.layer(layer)(ids, hidden) for layer in runtime.layer_ids}
    handle = runtime.prefetch(ids)
    for layer in (3, 1):  # any order
        np.testing.assert_array_equal(runtime.layer(layer).fuse(handle, hidden, input_ids=ids), expected[layer])


def test_prefetch_reads_its_own_copy_of_the_ids(folders, tiny_config):
    """The lookups of a prefetch run after it returns: changing the caller's array then changes nothing;
    two handles in flight at once give each its own answer."""
    runtime = EngramRuntime(folders["f32"])
    ids, hidden = random_inputs(tiny_config, 5000, 4, 9, seed=8)
    other, _ = random_inputs(tiny_config, 5000, 4, 9, seed=9)
    expected = {layer: runtime.layer(layer)(ids, hidden) for layer in runtime.layer_ids}
    expected_other = {layer: runtime.layer(layer)(other, hidden) for layer in runtime.layer_ids}
    mutable = ids.copy()
    first, second = runtime.prefetch(mutable), runtime.prefetch(other)
    mutable[:] = 0
    for layer in runtime.layer_ids:
        np.testing.assert_array_equal(runtime.layer(layer).fuse(second, hidden), expected_other[layer])
        np.testing.assert_array_equal(runtime.layer(layer).fuse(first, hidden), expected[layer])


def test_prefetch_faults_leave_the_runtime_usable(folders, layers):
    runtime = EngramRuntime(folders["f32"])
    other = EngramRuntime(folders["f32"])
    ids, hidden = random_inputs(layers[1].config, 5000, 2, 5, seed=12)
    handle = runtime.prefetch(ids)
    with pytest.raises(EngramError, match="not made by this runtime"):
        other.layer(1).fuse(handle, hidden)
    with pytest.raises(EngramError, match="made for other input_ids"):
        runtime.layer(1).fuse(handle, hidden, input_ids=ids + 1)
    with pytest.raises(EngramError, match=r"got \[2, 5, 3, 48\]"):
        runtime.layer(1).fuse(handle, hidden[:, :, :3])
    first = runtime.layer(1).fuse(handle, hidden)
    with pytest.raises(EngramError, match="already used for layer 1"):
        runtime.layer(1).fuse(handle, hidden)
    newer = runtime.prefetch(ids)  # a second handle in flight does not disturb the first
    np.testing.assert_array_equal(runtime.layer(3).fuse(handle, hidden), runtime.layer(3)(ids, hidden))
    with pytest.raises(EngramError, match="no Engram layer 2"):
        runtime.layer(2)
    with pytest.raises(EngramError, match="serves layers"):
        runtime(ids, hidden)
    with pytest.raises(EngramError, match="out of range"):
        runtime.prefetch(ids + 5000)
    np.testing.assert_array_equal(runtime.layer(1).fuse(newer, hidden), first)


def test_manifest_faults(folders, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["f32"], copy)
    (copy / "layer_3.bin").write_bytes((copy / "layer_3.bin").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(EngramError, match="layer_3.bin does not match its SHA-256"):
        EngramRuntime(copy)
    (copy / "layer_3.bin").unlink()
    with pytest.raises(EngramError, match="lists layer_3.bin, which is missing"):
        EngramRuntime(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(EngramError, match="not a valid manifest"):
        EngramRuntime(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(EngramError, match="has no manifest.json"):
        EngramRuntime(copy)


def test_folder_commands(folders, tmp_path, tiny_config):
    """``folders["onnx"]`` is the command line's ``export --random-init --seed 5`` of every layer."""
    manifest = json.loads((folders["onnx"] / "manifest.json").read_text())
    assert manifest["layers"] == {"1": "layer_1.onnx", "3": "layer_3.onnx"}
    cli("quantize", folders["onnx"], "-o", tmp_path / "int8w", "--mode", "int8-weights")
    assert read_manifest(tmp_path / "int8w").quantization == "int8-weights"
    ids, hidden = random_inputs(tiny_config, 5000, 2, 5)
    np.savez(tmp_path / "in.npz", input_ids=ids, hidden_states=hidden)
    cli("run", tmp_path / "int8w", "--layer", "3", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz")
    refused(
        cli("run", tmp_path / "int8w", "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o2.npz", check=False),
        "give --layer",
    )
    refused(cli("compile", folders["onnx"], "-o", folders["onnx"], check=False), "would overwrite an input")
    refused(
        cli("export", "--config", "tiny", "--weights", tmp_path / "in.npz", "-o", tmp_path / "x", check=False),
        "needs --prefix with {layer}",
    )
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


@pytest.mark.slow
def test_backbone_sample_runs(monkeypatch, capsys):
    """samples/backbone_prefetch.py, run as a script (in this process): MiniLM backbone in PyTorch, the
    Engram layer in OpenVINO."""
    import runpy
    import sys
    from pathlib import Path

    sample = Path(__file__).parents[1] / "samples" / "backbone_prefetch.py"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(sample), "--repeat", "2", "--steps", "2", "--precision", "f32"])
    runpy.run_path(str(sample), run_name="__main__")
    stdout = capsys.readouterr().out
    assert "engram lookup started" in stdout and "backbone layer 5" in stdout
    assert "outputs identical" in stdout and "greedy-style decode (2 steps" in stdout
    # the torch drop-in: in f32 the swapped model equals the PyTorch one up to float32 rounding
    (line,) = [line for line in stdout.splitlines() if line.startswith("drop-in:")]
    assert float(line.split("max difference ")[1].split()[0]) <= 1e-4, line
