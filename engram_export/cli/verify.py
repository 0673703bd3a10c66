"""engram-export verify: every runtime path against the PyTorch layer, at several shapes."""

from __future__ import annotations

import functools
from pathlib import Path

from engram_export.cli.common import FLAGS, add_layer_source, check_workdir, layer_from_args, working_folder
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_output_file

__all__ = ["add", "run", "report", "parse_shapes"]


def add(sub) -> None:
    p = sub.add_parser("verify", parents=[FLAGS], help="compare PyTorch, ONNX Runtime, OpenVINO f32 and bf16")
    add_layer_source(p, checkpoint=True)
    p.add_argument("--onnx", type=Path, help="an exported .onnx of this layer (default: export one)")
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="BxT",
        help="batch x tokens to check (repeatable; default 50x14, 1x1, 3x17)",
    )
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="also check this .xml (e.g. from quantize) against PyTorch (repeatable)",
    )
    p.add_argument("--workdir", type=Path, help="keep exported and compiled files here")
    p.set_defaults(func=run)


def parse_shapes(values: list[str] | None) -> list[tuple[int, int]]:
    shapes = []
    for value in values or ["50x14", "1x1", "3x17"]:
        try:
            batch, tokens = (int(v) for v in value.lower().split("x"))
        except ValueError:
            raise EngramError(f"shape {value!r} should look like 50x14") from None
        if batch < 1 or tokens < 1:
            raise EngramError(f"shape {value}: batch and tokens must be >= 1")
        shapes.append((batch, tokens))
    return shapes


def report(results) -> bool:
    """Print the comparison table and a loud line for each failure; True when every path passed."""
    from engram_export.measure.verify import comparisons_table, failures_summary

    print(comparisons_table(results))
    failed = failures_summary(results)
    print("\n".join(failed))
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return not failed


def run(args) -> int:
    shapes = parse_shapes(args.shape)
    check_workdir(args.workdir)
    if args.workdir is not None:  # what verify_layer writes there must not overwrite an input
        written = ["engram_f32.xml", "engram_bf16.xml"] + ([] if args.onnx else ["engram.onnx"])
        for name in written:
            check_output_file(args.workdir / name, Path(name).suffix, [args.onnx, *args.model])
    export = None
    if args.checkpoint is not None:  # DeepSeek-V4.1: the layer reads the checkpoint, tables mapped
        from engram_export.core.checkpoint import Checkpoint
        from engram_export.folders import export_checkpoint
        from engram_export.models.deepseek_v41 import open_layer
        from engram_export.models.deepseek_v41_config import V41Config

        if args.layer is None:
            raise EngramError("give --layer (one of the checkpoint's engram_layer_ids)")
        checkpoint = Checkpoint(args.checkpoint)
        layer = open_layer(checkpoint, V41Config.from_checkpoint(checkpoint), args.layer)
        export = functools.partial(export_checkpoint, args.checkpoint, layer_id=args.layer)
    else:
        layer = layer_from_args(args)
    from engram_export.measure.verify import verify_layer

    with working_folder(args.workdir, "engram-verify-") as workdir:
        return 0 if report(verify_layer(layer, workdir, args.onnx, shapes, args.model, export)) else 1
