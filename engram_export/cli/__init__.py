"""``engram-export``: export, compile, run and verify Engram layers from the command line.

One module per command, each with ``add(sub)`` declaring its arguments (the shared flags come from the
parent parsers in ``common.py``) and ``run(args)``, which imports torch, OpenVINO or ONNX Runtime only
when called, so ``--help`` stays instant. Any ``EngramError`` (bad input, file or config) is printed as
one line and exits with code 2; an ``EngramUnavailable`` (a table shard down, a Ray cluster that cannot
be reached: worth trying again later) with code 3. ``main`` turns any other error into one line too
(``--debug`` prints the trace, the cause included), and Ctrl-C into one line and exit code 130.
"""

from __future__ import annotations

import argparse
import sys

from engram_export.cli import (
    bench,
    calibrate,
    compile,
    demo,
    export,
    extension,
    optimize,
    quantize,
    run,
    serve_tables,
    verify,
)
from engram_export.cli.common import FLAGS
from engram_export.core.errors import EngramError, EngramUnavailable, one_line

__all__ = ["main", "build_parser"]

COMMANDS = (export, optimize, compile, quantize, calibrate, serve_tables, run, verify, demo, bench, extension)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-export", description=__doc__.splitlines()[0], parents=[FLAGS])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def error_line(exc: BaseException, command: str) -> tuple[str, int]:
    """The message and exit code for an error that reached ``main``: 2 for what the user can fix
    (an input, a path, the memory asked for), 3 for a resource that is not there now (a shard, a
    cluster), 130 for Ctrl-C, 1 for anything else (a bug)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, EngramUnavailable):
        return str(exc), 3
    if isinstance(exc, EngramError):
        return str(exc), 2
    if isinstance(exc, OSError):  # a path that cannot be read or written (space, permission, name length)
        where = f"{exc.filename}: " if exc.filename else f"{command} failed: "
        return f"{where}{exc.strerror or exc}", 2
    if isinstance(exc, MemoryError):
        return f"{command} failed: out of memory (a smaller table or batch may fit)", 2
    return f"{command} failed: {type(exc).__name__}: {one_line(exc)} (run with --debug for the trace)", 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    quiet, debug = getattr(args, "quiet", False), getattr(args, "debug", False)
    try:
        import logging

        from engram_export.core.progress import LOGGER, TerminalHandler

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        progress_log = logging.getLogger(LOGGER)
        progress_log.handlers[:] = [TerminalHandler(sys.stderr)]
        progress_log.propagate = False
        progress_log.setLevel(logging.WARNING if quiet else logging.INFO)
        return args.func(args) or 0
    except (KeyboardInterrupt, Exception) as exc:  # a last line of defence: one line, never a trace
        message, code = error_line(exc, args.command)
        if debug:
            import traceback

            traceback.print_exception(exc)
    print(f"engram-export: {'' if code == 130 else 'error: '}{' '.join(message.splitlines())}", file=sys.stderr)
    return code
