"""The exceptions users see, each described in one line: ``EngramError`` for a bad input, file or config,
and its subclass ``EngramUnavailable`` for something the call needs that is not there now (a table
shard down, a Ray cluster that cannot be reached), so that ``except EngramError`` catches both and the
CLI can still tell them apart (exit 2 and 3)."""

import re

__all__ = ["EngramError", "EngramUnavailable", "one_line"]


class EngramError(ValueError):
    """A problem with what the user gave (shape, dtype, id range, file, config); the CLI exits 2 on it."""


class EngramUnavailable(EngramError):
    """A resource that is not there now, through no fault of the input (a shard or its replicas down past
    the deadline, a cluster address where nothing answers): the same call may succeed later. The CLI
    exits 3 on it."""


def one_line(exc: BaseException) -> str:
    """The line of a library's message that says what went wrong: the first line that is not an
    OpenVINO source location (its messages start with ``Exception from src/...`` and ``Check '...'
    failed at src/...``, name the failing node, and give the reason last)."""
    lines = [line.strip().removeprefix("Caught exception: ") for line in str(exc).splitlines() if line.strip()]
    reasons = [
        line
        for line in lines
        if not line.startswith(("Exception from src/", "Check '"))
        and " at src/" not in line
        and not re.fullmatch(r"Node \S+ of type \S+", line)  # the CPU plugin names the node that failed
    ]
    return (reasons or lines or [type(exc).__name__])[0]
