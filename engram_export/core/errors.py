"""The one exception type users see: a bad input, file or config, described in one line."""

import re

__all__ = ["EngramError", "one_line"]


class EngramError(ValueError):
    """A problem with what the user gave (shape, dtype, id range, file, config); the CLI exits 2 on it."""


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
