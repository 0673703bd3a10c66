"""Manifests bind every file a layer reads: listed with size and hashes, inside the folder, holding the
layer the manifest names; and a single .xml binds its .bin. Each fault is refused with one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from engram_export.core import integrity
from engram_export.core.errors import EngramError
from engram_export.measure.verify import random_inputs
from engram_export.runtime import EngramRuntime


@pytest.fixture(scope="module")
def exported_with_data(tiny_config, tmp_path_factory):
    """Layer 1 of the tiny preset (seed 0) exported with its tensors in ``m.onnx.data``: one trace for
    the module; tests use ``data_copy``."""
    from engram_export.models.weights import build_layer
    from engram_export.onnx.export import export_layer

    folder = tmp_path_factory.mktemp("with_data")
    return export_layer(build_layer(tiny_config, 1, seed=0), folder / "m.onnx", external_data_threshold=1000)


def data_copy(exported, folder):
    """A copy of ``m.onnx`` and its ``m.onnx.data`` in ``folder`` (made if needed)."""
    folder.mkdir(exist_ok=True)
    for name in ("m.onnx", "m.onnx.data"):
        shutil.copyfile(exported.parent / name, folder / name)
    return folder / "m.onnx"


@pytest.fixture
def copy(folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(folders["f32"], folder)
    return folder


def edit(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda m: m["layers"].update({"1": "layer_3.xml", "3": "layer_1.xml"}),
            "holds layer 3; the manifest lists it as layer 1",
        ),
        (lambda m: m["files"]["layer_1.bin"].pop("sampled_sha256"), "needs a size and a sampled_sha256"),
        (lambda m: m["files"].pop("layer_1.bin"), "layer 1 reads layer_1.bin, which the manifest does not list"),
        (lambda m: m["files"].pop("layer_1.xml"), "layer 1's file layer_1.xml has no size and hash entry"),
        (lambda m: m["layers"].update({"1": "../elsewhere/layer_1.xml"}), "is not a file name inside the folder"),
        (lambda m: m["files"].update({"/etc/passwd": {"size": 1, "sampled_sha256": "x"}}), "not a file name inside"),
        (lambda m: m.update(layers={}), "lists no layers"),
        (lambda m: m.update(format=1), "this engram-export reads format 2"),
        (lambda m: m["files"]["layer_3.bin"].update(size=5), "layer_3.bin has"),
        (lambda m: m["config"].update(hidden_size=64), "another config than the manifest's"),
        (lambda m: m["layers"].update({"1": "layer_1.onnx"}), "is not an .xml file"),
    ],
)
def test_manifest_faults_are_refused(copy, change, message):
    edit(copy, change)
    with pytest.raises(EngramError, match=message):
        EngramRuntime(copy)


def test_symlinked_file_is_refused(copy, folders):
    (copy / "layer_3.bin").unlink()
    (copy / "layer_3.bin").symlink_to(folders["f32"] / "layer_3.bin")
    with pytest.raises(EngramError, match="layer_3.bin is a symbolic link"):
        EngramRuntime(copy)


def test_flipped_byte_in_a_bin_is_refused(copy, monkeypatch):
    """Files up to 1 GiB are hashed whole at load; with check_hashes='sampled' (or in a larger file)
    only the sampled blocks are, and check_hashes='full' finds a flip anywhere."""
    flip_byte(copy / "layer_1.bin", (copy / "layer_1.bin").stat().st_size // 2)
    with pytest.raises(EngramError, match="layer_1.bin does not match its SHA-256"):
        EngramRuntime(copy)
    with pytest.raises(EngramError, match="layer_1.bin does not match its sampled SHA-256"):
        EngramRuntime(copy, check_hashes="sampled")
    # the same file as if it were large: the sampled blocks (64 of 256 bytes here) miss the flip...
    monkeypatch.setattr(integrity, "WHOLE_LIMIT", 1024)
    monkeypatch.setattr(integrity, "BLOCK", 256)
    size = (copy / "layer_1.bin").stat().st_size
    gap_start = (size - 256) * 1 // 63 + 256
    assert gap_start < (size - 256) * 2 // 63  # there is an unsampled gap between blocks 1 and 2
    edit(
        copy,
        lambda m: m["files"]["layer_1.bin"].update(
            sampled_sha256=integrity.sampled_sha256(copy / "layer_1.bin"), size=size
        ),
    )
    flip_byte(copy / "layer_1.bin", gap_start)
    assert (
        integrity.sampled_sha256(copy / "layer_1.bin")
        == json.loads((copy / "manifest.json").read_text())["files"]["layer_1.bin"]["sampled_sha256"]
    )
    # ...and the full check finds it
    with pytest.raises(EngramError, match="layer_1.bin does not match its SHA-256"):
        EngramRuntime(copy)
    with pytest.raises(EngramError, match="layer_1.bin does not match its SHA-256"):
        EngramRuntime(copy, check_hashes="full")


def test_check_hashes_values(copy):
    assert EngramRuntime(copy, check_hashes="full").layer_ids == [1, 3]
    assert EngramRuntime(copy, check_hashes=False).layer_ids == [1, 3]
    with pytest.raises(EngramError, match="check_hashes must be"):
        EngramRuntime(copy, check_hashes="sometimes")


def test_one_load_hashes_each_file_once(copy, monkeypatch):
    """A folder's load has one FileChecks: the manifest hashes each file, a layer reading it again checks
    its size (as when a file is swapped under the load), and the runtime's verification sees the
    files the load left unhashed."""
    hashed: list = []
    whole = integrity.sha256
    monkeypatch.setattr(integrity, "sha256", lambda path, on_chunk=None: hashed.append(path) or whole(path, on_chunk))
    rt = EngramRuntime(copy, check_hashes="full")
    assert sorted(p.name for p in hashed) == sorted(json.loads((copy / "manifest.json").read_text())["files"])
    assert rt.verification.state == "verified"
    assert EngramRuntime(copy, check_hashes="sampled").verification.unverified  # left to a background pass


def test_a_load_s_checks_are_made_once_and_never_changed(tmp_path):
    checks = integrity.FileChecks("full", tables_elsewhere=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checks.tables_elsewhere = False  # type: ignore[misc]
    with pytest.raises(EngramError, match="check level must be one of"):
        integrity.FileChecks("later")
    path = tmp_path / "table.bin"
    path.write_bytes(b"0123456789")
    entry = integrity.fingerprint(path)
    checks.check(path, entry, "the test")
    path.write_bytes(b"9876543210")  # the same size: read again by the same load, checked by size only
    checks.check(path, entry, "the test")
    with pytest.raises(EngramError, match="does not match its SHA-256 in the test"):
        integrity.FileChecks("full").check(path, entry, "the test")
    assert checks.table_elsewhere(tmp_path / "absent.bin") and not checks.table_elsewhere(path)
    assert not integrity.FileChecks().table_elsewhere(tmp_path / "absent.bin")


def test_write_options_are_checked():
    from engram_export.core.fileio import WriteOptions

    with pytest.raises(EngramError, match="copy_table must be True or False"):
        WriteOptions(copy_table="yes")  # type: ignore[arg-type]


def test_single_xml_checks_its_bin(tiny_files, tmp_path):
    xml = tmp_path / "m.xml"
    shutil.copy(tiny_files["f32"], xml)
    shutil.copy(tiny_files["f32"].with_suffix(".bin"), xml.with_suffix(".bin"))
    ids, hidden = random_inputs(EngramRuntime(xml).config, 5000, 2, 3)
    flip_byte(xml.with_suffix(".bin"), 100)
    with pytest.raises(EngramError, match="m.bin does not match its SHA-256 in"):
        EngramRuntime(xml)
    xml.with_suffix(".bin").write_bytes(tiny_files["f32"].with_suffix(".bin").read_bytes()[:-8])
    with pytest.raises(EngramError, match="m.bin has .* bytes"):
        EngramRuntime(xml)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(EngramError, match="lists m.bin, which is missing"):
        EngramRuntime(xml)
    shutil.copy(tiny_files["f32"].with_suffix(".bin"), xml.with_suffix(".bin"))
    np.testing.assert_array_equal(EngramRuntime(xml)(ids, hidden), EngramRuntime(tiny_files["f32"])(ids, hidden))


def test_onnx_folder_lists_external_data(exported_with_data, tiny_config, tmp_path):
    from engram_export.folders.manifest import Manifest, model_files, read_manifest, write_manifest

    folder = data_copy(exported_with_data, tmp_path / "f").parent
    assert model_files(folder, "m.onnx") == ["m.onnx", "m.onnx.data"]
    write_manifest(folder, Manifest(tiny_config.replace(layer_ids=(1,)), {1: "m.onnx"}, "onnx"))
    assert set(read_manifest(folder).files) == {"m.onnx", "m.onnx.data"}
    flip_byte(folder / "m.onnx.data", 10)
    with pytest.raises(EngramError, match="m.onnx.data does not match"):
        read_manifest(folder)


def test_single_onnx_checks_its_external_data(exported_with_data, tiny_config, tmp_path):
    from engram_export.onnx.export import load_onnx, save_onnx

    path = data_copy(exported_with_data, tmp_path)
    ids, hidden = random_inputs(tiny_config, 5000, 2, 3)
    expected = EngramRuntime(path, runtime="ort")(ids, hidden)
    resaved = save_onnx(load_onnx(path), tmp_path / "again.onnx", external_data_threshold=1000)
    np.testing.assert_array_equal(EngramRuntime(resaved, runtime="ort")(ids, hidden), expected)
    inline = save_onnx(load_onnx(path), tmp_path / "inline.onnx")  # no data file, no record of one
    np.testing.assert_array_equal(EngramRuntime(inline, runtime="ort")(ids, hidden), expected)
    flip_byte(tmp_path / "m.onnx.data", 1000)
    for backend in ("ort", "ov"):
        with pytest.raises(EngramError, match="m.onnx.data does not match its SHA-256"):
            EngramRuntime(path, runtime=backend)


def test_an_onnx_file_is_read_once_and_nothing_else_is_written(exported_with_data, tmp_path, monkeypatch):
    """compile, quantize, and OpenVINO and ONNX Runtime loads of an .onnx, open the file once (the graph goes to
    OpenVINO and ONNX Runtime in memory, external data is mapped) and write nothing but their outputs:
    no lowered copy, no temporary folder, nothing beside the source (so a read-only one works)."""
    import builtins
    import os
    import tempfile
    from pathlib import Path

    from engram_export.openvino.compile import compile_onnx
    from engram_export.openvino.quantize import QuantizeOptions, quantize

    source = tmp_path / "source"
    path = data_copy(exported_with_data, source)
    before = sorted(p.name for p in source.iterdir())
    opened, real_open = [], builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def no_temporary_folder(*args, **kwargs):
        raise AssertionError("a temporary folder was made")

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_folder)
    for load in (
        lambda: compile_onnx(path, tmp_path / "m.xml"),
        lambda: quantize(path, tmp_path / "q.xml", QuantizeOptions("int8-weights")),
        lambda: EngramRuntime(path),
        lambda: EngramRuntime(path, runtime="ort"),
    ):
        opened.clear()
        load()
        assert opened.count(path.resolve()) == 1, opened
    assert sorted(p.name for p in source.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "q.bin", "q.xml", "source"]


def test_external_data_with_another_hard_link_is_read(exported_with_data, tiny_config, tmp_path):
    """An export whose data file has a second hard link (a backup made with ``cp -al``; DeepSeek-V4.1
    shards always have one) compiles and runs: onnx-ir's refusal of hard-linked data files does not
    apply to files engram-export has checked against their fingerprints."""
    import os

    from engram_export.onnx.files import load_onnx, save_onnx
    from engram_export.openvino.compile import compile_onnx

    path = data_copy(exported_with_data, tmp_path)
    (tmp_path / "again").mkdir()
    os.link(tmp_path / "m.onnx.data", tmp_path / "backup.data")
    ids, hidden = random_inputs(tiny_config, 5000, 2, 5)
    from_onnx = EngramRuntime(path)(ids, hidden)
    np.testing.assert_array_equal(EngramRuntime(compile_onnx(path, tmp_path / "m.xml"))(ids, hidden), from_onnx)
    resaved = save_onnx(load_onnx(path), tmp_path / "again" / "m.onnx", external_data_threshold=1000)
    np.testing.assert_array_equal(EngramRuntime(resaved)(ids, hidden), from_onnx)


@pytest.mark.parametrize("step", ["compile", "quantize"])
def test_compiling_a_folder_hashes_each_file_once(folders, monkeypatch, tmp_path, step):
    """compile_folder and quantize_folder are one load of the source folder: its manifest hashes each
    file, the layer reading it again checks its size."""
    from engram_export.folders import compile_folder, quantize_folder
    from engram_export.openvino.quantize import QuantizeOptions

    hashed: list = []
    whole = integrity.sha256
    monkeypatch.setattr(integrity, "sha256", lambda path, on_chunk=None: hashed.append(path) or whole(path, on_chunk))
    if step == "compile":
        compile_folder(folders["onnx"], tmp_path / "out", "f32")
    else:
        quantize_folder(folders["onnx"], tmp_path / "out", QuantizeOptions("int8-weights"))
    listed = json.loads((folders["onnx"] / "manifest.json").read_text())["files"]
    assert sorted(path.name for path in hashed if path.parent == folders["onnx"]) == sorted(listed)
