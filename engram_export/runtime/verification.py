"""How far a runtime's files have been verified, and the background pass that finishes the job.

A load checks each file to the depth its ``check_hashes`` asks (``integrity.FileChecks``): by default
every byte of each file up to 1 GiB, larger files (tables) by size and sampled SHA-256. With
``check_hashes="background"`` a thread then hashes those larger files whole, at the lowest CPU (and so
I/O) priority, dropping the pages it read from the page cache behind it (pages a lookup has mapped
stay). Until it is done the runtime serves calls; if a file differs, every later call of that runtime
is refused with one line naming the file.

States (``EngramRuntime.verification``): ``"verified"`` every byte of every file matched a recorded
SHA-256; ``"pending"`` the background pass is running; ``"failed"`` a file differs (calls refused);
``"partial"`` some files were checked by size and sampled hash only (``unverified`` names them: the
level asked for less, or they record no full hash, as a checkpoint shard linked from a plain folder).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from engram_export.core.errors import EngramError
from engram_export.core.integrity import FileChecks, sha256

__all__ = ["Verification", "STATES"]

STATES = ("verified", "pending", "failed", "partial")


class Verification:
    """The verification state of one runtime's files, shared by the runtime and its layers."""

    def __init__(self, checks: FileChecks | None = None, background: bool = False):
        deferred = list(checks.deferred) if checks is not None else []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: str | None = None
        self._unverified = [path for path, _, _ in deferred]
        to_hash = [item for item in deferred if "sha256" in item[1]] if background else []
        if not to_hash:
            self._done.set()
            return
        self._thread = threading.Thread(target=self._hash_all, args=(to_hash,), name="engram-verify", daemon=True)
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

    def _hash_all(self, items) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            for path, entry, where in items:
                try:
                    digest = sha256(path, on_chunk=_drop_behind)
                except OSError as exc:
                    self._fail(f"{path} could not be read to verify it ({exc.strerror})")
                    return
                if digest != entry["sha256"]:
                    self._fail(
                        f"{path} does not match its SHA-256 in {where} (changed or corrupt): this runtime "
                        f"refuses every call; load it again once the file is restored"
                    )
                    return
                with self._lock:
                    self._unverified.remove(path)
        finally:
            self._done.set()

    def _fail(self, message: str) -> None:
        with self._lock:
            self._error = message


def _drop_behind(fd: int, offset: int, nbytes: int) -> None:
    """Let the page cache drop what the hash read (a 94 GiB table would evict everything else)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
