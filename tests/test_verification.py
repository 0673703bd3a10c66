"""Every file verified: files up to 1 GiB hashed whole at load, larger ones by size and sampled hash and
then, with ``check_hashes="background"``, hashed whole by a thread; a file that differs makes every
later call fail with one line. "Large" is made small here by lowering ``integrity.LOAD_FULL_LIMIT``; a
flip "between the sampled blocks" is made by recording the flipped file's sampled hash."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from engram_export.core import integrity
from engram_export.core.errors import EngramError
from engram_export.folders.manifest import read_manifest
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.verify import random_inputs
from engram_export.runtime import EngramRuntime, verification
from tests.helpers import hf_snapshot, run_cli
from tests.v41_spec import TINY


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def flip_between_samples(path, record):
    """Flip a byte in the middle of ``path`` and put its new sampled hash into ``record`` (a file
    whose text holds the old one): what a flip between the sampled blocks of a large file looks like."""
    old = integrity.sampled_sha256(path)
    flip_byte(path, path.stat().st_size // 2)
    record.write_text(record.read_text().replace(old, integrity.sampled_sha256(path), 1))  # the first: sampled


@pytest.fixture
def xml(tiny_files, tmp_path):
    path = tmp_path / "m.xml"
    shutil.copyfile(tiny_files["f32"], path)
    shutil.copyfile(tiny_files["f32"].with_suffix(".bin"), path.with_suffix(".bin"))
    return path


@pytest.fixture
def large(monkeypatch):
    """Every file over 1000 bytes counts as large (checked by sampled hash at load)."""
    monkeypatch.setattr(integrity, "LOAD_FULL_LIMIT", 1000)


def test_a_flip_anywhere_in_a_file_up_to_1_gib_is_refused_at_load(xml):
    assert EngramRuntime(xml).verification.state == "verified"
    flip_between_samples(xml.with_suffix(".bin"), xml)
    with pytest.raises(EngramError, match=r"m.bin does not match its SHA-256 in .*m.xml \(changed or corrupt\)"):
        EngramRuntime(xml)
    loaded = EngramRuntime(xml, check_hashes="sampled")  # what the sampled hash alone lets through
    assert loaded.verification.state == "partial" and loaded.verification.unverified == [xml.with_suffix(".bin")]


def test_background_hashes_large_files_whole(xml, large):
    assert EngramRuntime(xml).verification.state == "partial"
    rt = EngramRuntime(xml, check_hashes="background")
    assert rt.verification.wait(60) == "verified" and rt.verification.unverified == []


def test_a_large_file_that_differs_fails_every_later_call(xml, large):
    flip_between_samples(xml.with_suffix(".bin"), xml)
    rt = EngramRuntime(xml, check_hashes="background")  # the sampled hash matches: it loads
    assert rt.verification.wait(60) == "failed"
    ids, hidden = random_inputs(rt.config, 5000, 2, 3)
    message = r"m.bin does not match its SHA-256 in .*m.xml \(changed or corrupt\): this runtime refuses every call"
    for call in (
        lambda: rt(ids, hidden),
        lambda: rt.prefetch(ids),
        lambda: rt.lookup(ids),
        lambda: rt.session(2).prefill(ids, {rt.layer_id: hidden}),
        lambda: rt[rt.layer_id].fuse(None, hidden),
    ):
        with pytest.raises(EngramError, match=message):
            call()


def test_calls_are_served_while_the_background_pass_runs(xml, large, monkeypatch):
    release = threading.Event()

    def slow_sha256(path, on_chunk=None):
        release.wait(60)
        return integrity.sha256(path, on_chunk)

    monkeypatch.setattr(verification, "sha256", slow_sha256)
    rt = EngramRuntime(xml, check_hashes="background")
    ids, hidden = random_inputs(rt.config, 5000, 2, 3)
    assert rt.verification.state == "pending"
    expected = rt(ids, hidden)
    release.set()
    assert rt.verification.wait(60) == "verified"
    np.testing.assert_array_equal(rt(ids, hidden), expected)


def test_a_folder_in_background(folders, tmp_path, large):
    copy = tmp_path / "model"
    shutil.copytree(folders["f32"], copy)
    assert EngramRuntime(copy, check_hashes="background").verification.wait(60) == "verified"
    flip_between_samples(copy / "layer_3.bin", copy / "manifest.json")
    rt = EngramRuntime(copy, check_hashes="background")
    assert rt.verification.wait(60) == "failed"
    ids, hidden = random_inputs(rt.config, 5000, 2, 3)
    with pytest.raises(EngramError, match="layer_3.bin does not match its SHA-256 in .*manifest.json"):
        rt[1](ids, hidden)  # every layer of the runtime refuses, not only the one whose file differs


def test_check_hashes_values_are_checked(xml):
    with pytest.raises(EngramError, match="check_hashes must be True, False, 'background' or one of"):
        EngramRuntime(xml, check_hashes="later")


@pytest.fixture(scope="module")
def v41_exports(tmp_path_factory):
    """A tiny V4.1 checkpoint as a Hugging Face cache snapshot and as a plain folder, each exported and
    compiled to folders."""
    root = tmp_path_factory.mktemp("v41_verify")
    plain = write_v41_checkpoint(root / "plain", TINY, tokenizer=True)
    snapshot = hf_snapshot(plain, root / "models--deepseek-ai--DeepSeek-V4.1-Flash")
    for name, checkpoint in (("hf", snapshot), ("plain", plain)):
        for args in (
            ("export", "--checkpoint", checkpoint, "-o", root / f"{name}_onnx"),
            ("compile", root / f"{name}_onnx", "--precision", "bf16", "-o", root / f"{name}_bf16"),
        ):
            assert run_cli(*args).returncode == 0
    return root


def shard_entries(folder):
    manifest = read_manifest(folder)
    return {name: entry for name, entry in manifest.files.items() if name.endswith(".safetensors")}


def test_a_hugging_face_snapshot_gives_its_shards_full_hashes(v41_exports):
    """The blob names are the shards' SHA-256: recorded at export without reading the table, carried
    through compile, checked whole by the background pass."""
    for kind in ("onnx", "bf16"):
        entries = shard_entries(v41_exports / f"hf_{kind}")
        assert len(entries) == 2
        for name, entry in entries.items():
            assert entry["sha256"] == integrity.sha256(v41_exports / f"hf_{kind}" / name)
        assert not any("sha256" in e for e in shard_entries(v41_exports / f"plain_{kind}").values())


def test_v41_in_background(v41_exports, tmp_path, large):
    rt = EngramRuntime(v41_exports / "hf_bf16", check_hashes="background")
    assert rt.verification.wait(60) == "verified"
    plain = EngramRuntime(v41_exports / "plain_bf16", check_hashes="background")  # shards with no full hash
    assert plain.verification.wait(60) == "partial"
    assert sorted(p.name for p in plain.verification.unverified) == sorted(shard_entries(v41_exports / "plain_bf16"))
    copy = tmp_path / "copy"
    shutil.copytree(v41_exports / "hf_bf16", copy)  # copies: the shards are no longer the snapshot's blobs
    shard = next(name for name in shard_entries(copy))
    flip_between_samples(copy / shard, copy / "manifest.json")
    rt = EngramRuntime(copy, check_hashes="background")
    assert rt.verification.wait(60) == "failed" and shard in rt.verification.error
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["files"][shard]["sha256"] != integrity.sha256(copy / shard)


def test_a_dropped_runtime_stops_its_background_pass(xml, large, monkeypatch):
    """A server that reloads models must not pile up threads hashing tables of runtimes it dropped."""
    import gc

    started, chunks = threading.Event(), []

    def chunked_sha256(path, on_chunk=None):
        started.set()
        fd = os.open(path, os.O_RDONLY)
        try:
            for index in range(200):  # a long file, 16 MiB at a time
                time.sleep(0.01)
                chunks.append(index)
                on_chunk(fd, 0, 0)
        finally:
            os.close(fd)
        return "0" * 64

    monkeypatch.setattr(verification, "sha256", chunked_sha256)
    rt = EngramRuntime(xml, check_hashes="background")
    thread = rt.verification._thread
    assert started.wait(10) and rt.verification.state == "pending"
    del rt
    gc.collect()
    thread.join(10)
    assert not thread.is_alive() and len(chunks) < 200
