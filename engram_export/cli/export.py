"""engram-export export: PyTorch layers (a config and weights) or a DeepSeek-V4.1 checkpoint to ONNX."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import (
    COPY_TABLE,
    FLAGS,
    add_layer_source,
    check_output,
    layer_from_args,
    write_options,
)
from engram_export.core.errors import EngramError

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "export", parents=[FLAGS, COPY_TABLE], help="trace Engram layers to ONNX (hash-gather as one custom node)"
    )
    add_layer_source(p, checkpoint=True)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output .onnx file; without --layer, a folder for every layer with a manifest",
    )
    p.add_argument("--no-optimize", action="store_true", help="keep the raw trace (no graph passes)")
    p.set_defaults(func=run)


def run(args) -> None:
    from engram_export.onnx.export import export_layer

    check_output(args.output, args.layer is None, ".onnx", [args.weights, args.checkpoint])
    if args.checkpoint is not None:
        from engram_export.folders import export_checkpoint

        if args.config is not None:
            raise EngramError("--checkpoint brings its own config.json: drop --config")
        print(export_checkpoint(args.checkpoint, args.output, args.layer, write_options(args)))
        return
    from engram_export.models.config import is_deepseek_v41, load_config

    if args.config is None:
        raise EngramError("give --config (a preset or JSON file) or --checkpoint")
    config = load_config(args.config)
    if is_deepseek_v41(config):
        from engram_export.folders import export_random_v41

        if not args.random_init:
            raise EngramError(
                "DeepSeek-V4.1 layers are exported from their checkpoint folder: use "
                "--checkpoint DIR (or --config with --random-init)"
            )
        print(export_random_v41(config, args.output, args.layer, args.seed, write_options(args)))
        return
    if args.layer is None:
        from engram_export.folders import export_folder

        print(
            export_folder(
                config,
                args.output,
                weights=args.weights,
                prefix=args.prefix,
                seed=args.seed,
                optimize=not args.no_optimize,
            )
        )
        return
    layer = layer_from_args(args)
    print(export_layer(layer, args.output, optimize=not args.no_optimize))
