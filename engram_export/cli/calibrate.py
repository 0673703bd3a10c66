"""engram-export calibrate: choose the hot table rows of a folder on real text, for table_memory="tiered"."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import COPY_TABLE, FLAGS, check_output, write_options

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        parents=[FLAGS, COPY_TABLE],
        help="count table lookups on real text and keep the hottest rows in memory (table_memory='tiered')",
    )
    p.add_argument("model", type=Path, help="a folder from export, compile or quantize (either family)")
    p.add_argument(
        "--text",
        type=Path,
        action="append",
        required=True,
        help="UTF-8 text file, tokenized by the model's tokenizer (repeatable)",
    )
    p.add_argument(
        "--hot-budget",
        required=True,
        help="memory for the hot rows: a size (8GiB, 512MiB, bytes) or a share of the tables (5%%)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the new folder (the input is never written)")
    p.set_defaults(func=run)


def run(args) -> None:
    from engram_export.core.errors import EngramError

    if not args.model.is_dir():
        raise EngramError(f"calibrate takes a folder with a manifest; {args.model} is not a folder")
    check_output(args.output, True, "", [args.model])
    from engram_export.folders.calibration import calibrate, describe

    report = calibrate(args.model, args.output, args.text, args.hot_budget, write_options(args))
    print(describe(report))
    print(args.output)
