"""What the commands share: parent parsers for the shared flags, the layer source, and the checks of
paths and counts every command makes before any work."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from engram_export.core.errors import EngramError
from engram_export.core.fileio import WriteOptions, check_output_file, check_output_folder

__all__ = [
    "FLAGS",
    "COPY_TABLE",
    "write_options",
    "add_layer_source",
    "layer_from_args",
    "check_workdir",
    "working_folder",
    "check_at_least",
    "check_output",
    "with_table_size",
    "stage",
]


def _flags() -> argparse.ArgumentParser:
    """-q and --debug, accepted before the command and after it (SUPPRESS: a subcommand's default
    does not overwrite what the main parser read)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress lines")
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the trace of an unexpected error"
    )
    return parser


def _copy_table() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--copy-table",
        action="store_true",
        help="DeepSeek-V4.1: copy the table shards where no hard link can be made "
        "(another file system) instead of refusing",
    )
    return parser


FLAGS, COPY_TABLE = _flags(), _copy_table()


def write_options(args) -> WriteOptions:
    """How a command that writes (export, compile, quantize, calibrate) writes, from its flags."""
    return WriteOptions(copy_table=args.copy_table)


def add_layer_source(parser: argparse.ArgumentParser, checkpoint: bool = False) -> None:
    parser.add_argument("--config", required=not checkpoint, help="preset name (tiny, deepseek-demo) or JSON file")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", type=Path, help=".safetensors or .pt state dict")
    weights.add_argument("--random-init", action="store_true", help="seeded random weights")
    if checkpoint:
        weights.add_argument(
            "--checkpoint",
            type=Path,
            help="DeepSeek-V4.1 checkpoint folder (config.json, tokenizer.json, "
            "safetensors shards): tables stay in its shards, hard-linked",
        )
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    parser.add_argument("--prefix", default="", help="key prefix of the layer in a full-model checkpoint")
    parser.add_argument("--layer", type=int, help="layer id (one of the config's layer_ids)")


def layer_from_args(args):
    from engram_export.models.config import load_config
    from engram_export.models.weights import build_layer

    if args.layer is None:
        raise EngramError("give --layer (one of the config's layer_ids)")
    config = load_config(args.config)
    with stage(f"building layer {args.layer} ({'random' if args.random_init else args.weights})"):
        return build_layer(
            config, args.layer, weights=args.weights, prefix=args.prefix, seed=args.seed if args.random_init else None
        )


def check_workdir(workdir: Path | None) -> None:
    """Refuse a missing or read-only ``--workdir`` before any work."""
    if workdir is not None and not workdir.is_dir():
        raise EngramError(f"workdir {workdir} does not exist")
    if workdir is not None and not os.access(workdir, os.W_OK | os.X_OK):
        raise EngramError(f"cannot write to {workdir} (Permission denied)")


@contextlib.contextmanager
def working_folder(workdir: Path | None, prefix: str):
    """``workdir`` if given (checked by ``check_workdir``), else a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        yield workdir or Path(scratch)


def check_at_least(minimum: int, **values: int | None) -> None:
    """Refuse ``--name`` values below ``minimum``; None means not given (0 is a value, not 'absent')."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise EngramError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_output(output: Path, folder: bool, suffix: str, inputs) -> None:
    """Check ``-o`` before any work: a folder for a folder of layers, else a ``suffix`` file."""
    if folder:
        check_output_folder(output, inputs)
    else:
        check_output_file(output, suffix, inputs)


def with_table_size(config, engram_vocab_size: int | None):
    """``config`` with ``--engram-vocab-size`` for every n-gram order, if given."""
    check_at_least(1, engram_vocab_size=engram_vocab_size)
    if engram_vocab_size is None:
        return config
    return config.replace(engram_vocab_size=(engram_vocab_size,) * (config.max_ngram_size - 1))


def stage(what):
    from engram_export.core.progress import stage

    return stage(what)
