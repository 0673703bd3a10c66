"""The names tables and their shards go by on a Ray cluster, and the line a Ray failure is told in."""

from __future__ import annotations

import re

from engram_export.core.errors import EngramError, one_line

__all__ = ["NAMESPACE", "check_name", "replica_name", "cause_of"]

NAMESPACE = "engram-export"  # the Ray namespace of every actor this project starts
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    """``name`` if it may name served tables, else a one-line error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EngramError(
            f"a tables name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def replica_name(name: str, shard: int, replica: int) -> str:
    return f"{name}.shard{shard}.replica{replica}"


def cause_of(failure: BaseException | None) -> str:
    """The one line that says why a Ray call failed: a shard's own error (a task error's cause), not
    Ray's traceback."""
    if failure is None:
        return "-"
    cause = getattr(failure, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else failure)
