"""The one exception type users see: a bad input, file or config, described in one line."""

__all__ = ["EngramError", "one_line"]


class EngramError(ValueError):
    """A problem with what the user gave (shape, dtype, id range, file, config); the CLI exits 2 on it."""


def one_line(exc: BaseException) -> str:
    """The line of a library's multi-line message that says what went wrong (OpenVINO puts the
    source location first and the reason last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
