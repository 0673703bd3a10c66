"""File I/O with clear errors: checked inputs, and outputs that appear whole or not at all (written
into a hidden staging folder beside, then renamed)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.resources import require_disk

__all__ = [
    "staged_output",
    "staged_folder",
    "check_input_file",
    "check_output_file",
    "check_output_folder",
    "load_npz",
    "link_or_copy",
    "WriteOptions",
    "DEFAULT_WRITE",
    "data_extents",
    "STAGING_PREFIX",
]

# Short and fixed: a staging name derived from the output's (up to 255 bytes) could be too long.
STAGING_PREFIX = ".engram-staging-"


def written_files(path: Path) -> list[Path]:
    """``path`` and the side files written (or read) with it: an IR's .bin, ONNX external data."""
    side = {".xml": [path.with_suffix(".bin")], ".onnx": [path.parent / f"{path.name}.data"]}
    return [path, *side.get(path.suffix, [])]


def _check_targets(targets: list[Path], inputs: Iterable[Path | None]) -> None:
    """Refuse a missing or read-only output folder, a name too long for it, or an output that would
    overwrite one of ``inputs`` (side files included)."""
    folder = targets[0].parent
    if not folder.is_dir():
        raise EngramError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngramError(f"cannot write to {folder} (Permission denied)")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    sources = {p.resolve() for given in inputs if given is not None for p in written_files(Path(given))}
    for target in targets:
        if len(os.fsencode(target.name)) > name_max:
            raise EngramError(f"output name {target.name} is longer than the {name_max} bytes {folder} allows")
        if target.resolve() in sources:
            raise EngramError(f"output {target} would overwrite an input")


def check_output_file(path: str | Path, suffix: str, inputs: Iterable[Path | None] = ()) -> Path:
    """Refuse, before any work, an output file that could not be written whole: wrong suffix, missing
    or read-only folder, a folder in its place (or its side file's), or one of ``inputs``."""
    path = Path(path)
    if path.suffix != suffix:
        raise EngramError(f"output {path} should end in {suffix}")
    _check_targets(written_files(path), inputs)
    for target in written_files(path):
        if target.is_dir():
            raise EngramError(f"output {target} is a folder")
    return path


def check_output_folder(folder: str | Path, inputs: Iterable[Path | None] = ()) -> Path:
    """Refuse, before any work, an output folder that exists with something in it, or in a missing or
    read-only folder, or that is one of ``inputs``."""
    folder = Path(folder)
    _check_targets([folder], inputs)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EngramError(f"output {folder} exists and is not an empty folder")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass  # another user's process (or a pid we cannot ask about): leave its folder alone
    return True


def _make_staging(parent: Path) -> Path:
    """A fresh hidden folder in ``parent`` (mode from the umask), after removing the staging folders
    that dead processes (killed runs) left there."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            pid = entry.name[len(STAGING_PREFIX) :].split("-")[0]
            if entry.name.startswith(STAGING_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
    staging = parent / f"{STAGING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise EngramError(f"cannot write to {parent} ({exc.strerror})") from exc
    return staging


@contextlib.contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Yield a path to write ``path`` (and any side files: external data, .bin) into.

    The yielded path lies in a fresh hidden folder beside ``path``. When the block ends without an
    exception, every file in that folder is renamed into place, the main file last, so a reader never
    sees a main file whose side files are missing. On an exception nothing is left behind.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise EngramError(f"output folder {path.parent} does not exist")
    staging = _make_staging(path.parent)
    try:
        yield staging / path.name
        written = sorted(staging.iterdir(), key=lambda f: f.name == path.name)
        for file in written:
            if (path.parent / file.name).is_dir():
                raise EngramError(f"output {path.parent / file.name} is a folder")
        for file in written:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``folder`` to fill; renamed to ``folder`` at the end (which
    must not exist or be empty), removed on an exception."""
    folder = check_output_folder(folder)
    staging = _make_staging(folder.parent)
    try:
        yield staging
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_input_file(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    path = Path(path)
    if path.suffix not in suffixes:
        raise EngramError(f"{what}: {path} should end in {' or '.join(suffixes)}")
    if not path.is_file():
        raise EngramError(f"{what}: {path} does not exist")
    return path


def load_npz(path: str | Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The arrays ``names`` (and those of ``optional`` it holds) of an .npz file (no pickles), or an
    error naming what is wrong."""
    path = check_input_file(path, (".npz",), "inputs")
    with _unreadable(path):
        data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # np.load reads an .npy whatever its name
        raise EngramError(f"inputs: {path} is not an .npz archive (it holds a single array, like an .npy file)")
    with data, _unreadable(path):
        missing = [n for n in names if n not in data.files]
        if missing:
            raise EngramError(
                f"inputs: {path} has no {', '.join(missing)} (found {', '.join(data.files) or 'nothing'})"
            )
        return {n: data[n] for n in (*names, *optional) if n in data.files}


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """Errors of numpy and zipfile reading ``path`` (corrupt, truncated, pickled) as one line."""
    try:
        yield
    except EngramError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise EngramError(f"inputs: {path} is not a readable .npz ({exc})") from exc


# link() errors that mean "no hard link can be made here", where a copy is the way out
_NO_LINK = {
    errno.EXDEV: "another file system",
    errno.EPERM: "hard links not allowed there",
    errno.EMLINK: "too many links to the file",
    errno.EOPNOTSUPP: "no hard links on that file system",
}


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """How export, compile, quantize and calibrate write their outputs: made once by the caller (the
    command line, from its flags) and passed down whole to every function that writes.

    ``copy_table``: a table file kept outside the model (a DeepSeek-V4.1 checkpoint shard, a tiered
    table) is hard-linked beside the output (``place_table``); where no link can be made (another file
    system) it is copied, sparse, with ``copy_table``, and refused without it.
    """

    copy_table: bool = False

    def __post_init__(self):
        if not isinstance(self.copy_table, bool):
            raise EngramError(f"copy_table must be True or False, got {self.copy_table!r}")

    def place_table(self, source: Path, target: Path) -> None:
        """``target`` as a hard link to the table file ``source``, or a copy (``link_or_copy``)."""
        link_or_copy(source, target, self.copy_table)


DEFAULT_WRITE = WriteOptions()  # tables hard-linked, never copied


def link_or_copy(source: Path, target: Path, copy: bool) -> None:
    """``target`` as a hard link to the file ``source`` is, symbolic links followed (a Hugging Face
    cache snapshot is relative links into ``../../blobs``): no bytes copied. Where no link can be made
    (another file system), a sparse copy when ``copy`` is asked for, refused at once if the target's
    file system cannot hold it. Any other error is reported as it is."""
    given = Path(source)
    try:
        source = given.resolve(strict=True)
    except OSError as exc:
        raise EngramError(f"cannot read the table file {given} ({exc.strerror})") from exc
    try:
        os.link(source, target, follow_symlinks=False)  # ``source`` is resolved: a link to the file itself
        return
    except OSError as exc:
        size = source.stat().st_size
        why = _NO_LINK.get(exc.errno or 0)
        if why is None:
            raise EngramError(f"cannot hard-link the table file {given} as {target} ({exc.strerror})") from exc
        if not copy:
            raise EngramError(
                f"cannot hard-link the table file {given} into {target.parent} ({why}): put the output on "
                f"the same file system, or pass --copy-table to copy {size / 2**30:.1f} GiB"
            ) from exc
    copy_sparse(source, target, given.name)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) of every run of data in the open file ``fd`` of ``size`` bytes: holes of a
    sparse file left out (the whole file when the file system cannot tell)."""
    extents, offset = [], 0
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, size) - start))
            offset = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past ``offset``
            return extents
        return [(0, size)] if size else []
    return extents


def copy_sparse(source: Path, target: Path, name: str | None = None) -> None:
    """Copy ``source`` to ``target`` writing only its data (holes stay holes), after checking that the
    target's file system (and memory, for a tmpfs) holds the data; progress in bytes."""
    name = name or source.name
    with open(source, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        extents = data_extents(src.fileno(), size)
        data = sum(length for _, length in extents)
        what = f"copying {name} ({size / 2**30:.1f} GiB, {data / 2**30:.1f} GiB of data)"
        require_disk(target.parent, data, what)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with progress.steps(f"copying {name}", data, "GiB") as counter:
                for start, length in extents:
                    os.lseek(out, start, os.SEEK_SET)  # sendfile writes at the file position: holes skipped
                    done = 0
                    while done < length:
                        sent = os.sendfile(out, src.fileno(), start + done, min(length - done, 1 << 30))
                        if sent == 0:
                            raise EngramError(f"copying {source}: the file ended early (changed while copied?)")
                        done += sent
                        counter.advance(sent)
            os.ftruncate(out, size)
        except OSError as exc:
            raise EngramError(f"copying {source} to {target.parent} failed ({exc.strerror})") from exc
        finally:
            os.close(out)
