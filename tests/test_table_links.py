"""Table shards beside a model: linked from a Hugging Face cache snapshot (relative symbolic links into
``../../blobs``), copied sparse with ``--copy-table``, and a copy the target cannot hold refused before
its first byte. The small file systems are tmpfs mounts made by the test (root only; skipped elsewhere
with the reason)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.core.fileio import data_extents, link_or_copy
from engram_export.folders.manifest import read_manifest
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.runtime import EngramRuntime
from tests.helpers import hf_snapshot, listing, refused, run_cli
from tests.v41_spec import TINY


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    plain = write_v41_checkpoint(root / "plain", TINY, tokenizer=True)
    return hf_snapshot(plain, root / "models--deepseek-ai--DeepSeek-V4.1-Flash")


def small_tmpfs(folder: Path, size: str):
    """Mount a tmpfs of ``size`` at ``folder`` (skips the test where it cannot); returns the unmounter."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return lambda: subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    unmount = small_tmpfs(tmp_path / "tmpfs", "64m")
    yield tmp_path / "tmpfs"
    unmount()


def test_a_snapshot_of_links_exports_compiles_and_runs(snapshot, tmp_path):
    code, _, err = run_cli("export", "--checkpoint", snapshot, "--layer", 3, "-o", tmp_path / "v41.onnx")
    assert code == 0, err
    shard = tmp_path / "v41.model-00002-of-00002.safetensors"
    assert not shard.is_symlink()  # a hard link to the blob itself: nothing copied
    assert shard.samefile((snapshot / "model-00002-of-00002.safetensors").resolve())
    code, _, err = run_cli("export", "--checkpoint", snapshot, "-o", tmp_path / "folder")
    assert code == 0, err
    code, _, err = run_cli("compile", tmp_path / "folder", "--precision", "f32", "-o", tmp_path / "f32")
    assert code == 0, err
    plain = EngramRuntime(tmp_path / "v41.onnx")
    served = EngramRuntime(tmp_path / "f32")
    rng = np.random.default_rng(0)
    ids, hidden = rng.integers(0, 5000, (2, 5)), rng.normal(size=(2, 5, 4, 48)).astype(np.float32)
    np.testing.assert_array_equal(served[3](ids, hidden), plain(ids, hidden))
    assert read_manifest(tmp_path / "f32").layers == {1: "layer_1.xml", 3: "layer_3.xml"}


def test_link_errors_other_than_cross_device_say_what_they_are(snapshot, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(EngramError, match=r"as .*taken \(File exists\)$"):
        link_or_copy(snapshot / "model-00001-of-00002.safetensors", tmp_path / "taken", copy=True)
    with pytest.raises(EngramError, match=r"cannot read the table file .* \(No such file"):
        link_or_copy(snapshot / "missing.safetensors", tmp_path / "x", copy=True)


def test_across_file_systems_the_link_is_refused_or_copied_sparse(snapshot, tmpfs):
    before = listing(tmpfs)
    refused(
        run_cli("export", "--checkpoint", snapshot, "--layer", 3, "-o", tmpfs / "v41.onnx"),
        "(another file system): put the output on the same file system, or pass --copy-table",
    )
    assert listing(tmpfs) == before
    code, _, err = run_cli("export", "--checkpoint", snapshot, "--layer", 3, "-o", tmpfs / "v41.onnx", "--copy-table")
    assert code == 0, err
    copied = tmpfs / "v41.model-00002-of-00002.safetensors"
    assert copied.read_bytes() == (snapshot / "model-00002-of-00002.safetensors").read_bytes()


def sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def test_a_sparse_table_stays_sparse(tmp_path, tmpfs):
    """8 GiB logical, 3 written runs: copied into a 64 MiB tmpfs, holes kept, every byte equal."""
    rng = np.random.default_rng(1)
    writes = {offset: rng.bytes(70_000) for offset in (0, 3 << 30, (8 << 30) - 70_000)}
    source = sparse_file(tmp_path / "table.safetensors", 8 << 30, writes)
    link_or_copy(source, tmpfs / "table.safetensors", copy=True)
    copy = tmpfs / "table.safetensors"
    assert copy.stat().st_size == 8 << 30
    assert copy.stat().st_blocks * 512 < 4 << 20  # the data alone, not 8 GiB of zeros
    with open(copy, "rb") as f:
        for offset, data in writes.items():
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(1 << 30)
        assert f.read(4096) == bytes(4096)
        assert sum(n for _, n in data_extents(f.fileno(), 8 << 30)) < 4 << 20


def test_a_copy_that_cannot_fit_is_refused_before_its_first_byte(tmp_path, tmpfs):
    source = sparse_file(tmp_path / "dense.safetensors", 80 << 20, {0: os.urandom(80 << 20)})
    with pytest.raises(
        EngramError, match=r"copying dense.safetensors .* would need 80.0 MiB of disk in .*, 6\d.\d MiB"
    ):
        link_or_copy(source, tmpfs / "dense.safetensors", copy=True)
    assert list(tmpfs.iterdir()) == []


def test_a_tmpfs_copy_is_bounded_by_memory_too(tmp_path, monkeypatch):
    """A tmpfs is RAM: its size limit may exceed what the machine has free (the OOM killer's case)."""
    import psutil

    unmount = small_tmpfs(tmp_path / "big", "1g")
    try:
        source = sparse_file(tmp_path / "table.safetensors", 16 << 20, {0: os.urandom(16 << 20)})
        real = psutil.virtual_memory()
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=8 << 20))
        with pytest.raises(
            EngramError,
            match=r"a tmpfs: its files are held in memory\) would need 16.0 MiB of memory, 8.0 MiB available",
        ):
            link_or_copy(source, tmp_path / "big" / "table.safetensors", copy=True)
        assert list((tmp_path / "big").iterdir()) == []
    finally:
        unmount()
