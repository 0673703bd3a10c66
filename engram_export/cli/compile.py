"""engram-export compile: an exported .onnx (or folder) to OpenVINO IR, f32 or bf16."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import COPY_TABLE, FLAGS, check_output, write_options

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "compile", parents=[FLAGS, COPY_TABLE], help="convert an exported .onnx (or folder) to OpenVINO IR for CPU"
    )
    p.add_argument("model", type=Path, help="exported .onnx, or a folder from export without --layer")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="output .xml (the .bin goes beside), or a folder for a folder"
    )
    p.set_defaults(func=run)


def run(args) -> None:
    check_output(args.output, args.model.is_dir(), ".xml", [args.model])
    if args.model.is_dir():
        from engram_export.folders import compile_folder

        print(compile_folder(args.model, args.output, args.precision, write_options(args)))
        return
    from engram_export.openvino.compile import compile_onnx

    print(compile_onnx(args.model, args.output, args.precision, write_options(args)))
