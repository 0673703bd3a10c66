"""The one exception type users see: a bad input, file or config, described in one line."""

__all__ = ["EngramError"]


class EngramError(ValueError):
    """A problem with what the user gave (shape, dtype, id range, file, config); the CLI exits 2 on it."""
