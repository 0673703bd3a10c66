"""How far a runtime's files have been verified, and the background pass that finishes the job.

A load checks each file to the depth its ``check_hashes`` asks (``integrity.FileChecks``): by default
every byte of each file up to 1 GiB, larger files (tables) by size and sampled SHA-256. With
``check_hashes="background"`` a thread then hashes those larger files whole, at the lowest CPU (and so
I/O) priority, dropping the pages it read from the page cache behind it (pages a lookup has mapped
stay). Until it is done the runtime serves calls; if a file differs, every later call of that runtime
is refused with one line naming the file. A runtime dropped before the pass ends stops it. A file
truncated or written while it is served (``openvino/file_guard.py``) fails the runtime the same way,
from the call that saw it on.

States (``EngramRuntime.verification``): ``"verified"`` every byte of every file matched a recorded
SHA-256; ``"pending"`` the background pass is running; ``"failed"`` a file differs (calls refused);
``"partial"`` some files were checked by size and sampled hash only (``unverified`` names them: the
level asked for less, or they record no full hash, as a checkpoint shard linked from a plain folder).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path

from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks, sha256
from engram_export.openvino.file_guard import FileGuard

__all__ = ["Verification", "STATES"]

STATES = ("verified", "pending", "failed", "partial")


class Verification:
    """The verification state of one runtime's files, shared by the runtime and its layers."""

    def __init__(self, checks: FileChecks | None = None, background: bool = False, guards: Iterable = ()):
        # the layers' mapped files (openvino/file_guard.py), checked in one call
        self._files = FileGuard.union(guards)
        deferred = list(checks.deferred) if checks is not None else []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: str | None = None
        self._unverified = [path for path, _, _ in deferred]
        to_hash = [item for item in deferred if "sha256" in item[1]] if background else []
        if not to_hash:
            self._done.set()
            return
        # the thread holds the state weakly: a runtime dropped before its pass ends stops it at the next
        # 16 MiB (a server that reloads models must not pile up threads hashing 94 GiB tables)
        self._thread = threading.Thread(
            target=_hash_all, args=(weakref.ref(self), to_hash), name="engram-verify", daemon=True
        )
        self._thread.start()

    @property
    def state(self) -> str:
        with self._lock:
            if self._error is not None:
                return "failed"
            if not self._done.is_set():
                return "pending"
            return "partial" if self._unverified else "verified"

    @property
    def unverified(self) -> list[Path]:
        """The files not (yet) hashed whole."""
        with self._lock:
            return list(self._unverified)

    @property
    def error(self) -> str | None:
        return self._error

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the background pass (at most ``timeout`` seconds); returns the state."""
        self._done.wait(timeout)
        return self.state

    def check(self) -> None:
        """Refuse a call of a runtime whose files failed verification."""
        if self._error is not None:
            raise EngramError(self._error)

    def served(self) -> _Served:
        """Around a call that reads the runtime's files (``with verification.served(): ...``): when it
        ends, returned or failed, refuse it (and every later call) if a mapped file was truncated or
        written meanwhile or before (``openvino/file_guard.py``): its answer may hold zeros or other
        bytes, and a read that failed on it is named by the file."""
        return _Served(self)

    def check_files(self) -> None:
        """Refuse the call that ends now, and every later one, if a guarded file changed."""
        message = self._files.changed()
        if message is not None:
            self._fail(message)
        self.check()

    def _fail(self, message: str) -> None:
        with self._lock:
            self._error = message


class _Served:
    """``Verification.served``'s context: a class, not a generator (it wraps every call: ~1 us)."""

    __slots__ = ("verification",)

    def __init__(self, verification: Verification):
        self.verification = verification

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info) -> None:  # never swallows the call's own error; may replace it
        self.verification.check_files()


class _Dropped(Exception):
    """The runtime whose files were being hashed is gone."""


def _hash_all(state: weakref.ref, items) -> None:
    """Hash each file whole and compare; record the outcome in ``state()`` while it exists."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)

    def on_chunk(fd: int, offset: int, nbytes: int) -> None:
        if state() is None:
            raise _Dropped
        _drop_behind(fd, offset, nbytes)

    try:
        for path, entry, where in items:
            message: str | None = None
            try:
                digest = sha256(path, on_chunk=on_chunk)
            except OSError as exc:
                message = f"{path} could not be read to verify it ({exc.strerror})"
            else:
                if digest != entry["sha256"]:
                    message = (
                        f"{path} does not match its SHA-256 in {where} (changed or corrupt): this runtime "
                        f"refuses every call; load it again once the file is restored"
                    )
            verification = state()
            if verification is None:
                return
            if message is not None:
                verification._fail(message)
                return
            with verification._lock:
                verification._unverified.remove(path)
            del verification
    except _Dropped:
        return
    finally:
        verification = state()
        if verification is not None:
            verification._done.set()


def _drop_behind(fd: int, offset: int, nbytes: int) -> None:
    """Let the page cache drop what the hash read (a 94 GiB table would evict everything else)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
