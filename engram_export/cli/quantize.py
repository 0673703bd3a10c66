"""engram-export quantize: NNCF INT8 / INT4 weights or static INT8 (calibrated on text or data)."""

from __future__ import annotations

from pathlib import Path

from engram_export.cli.common import COPY_TABLE, FLAGS, check_at_least, check_output, write_options
from engram_export.core.errors import EngramError

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser(
        "quantize", parents=[FLAGS, COPY_TABLE], help="NNCF: INT8/INT4 weights or static INT8, table compressed per row"
    )
    p.add_argument("model", type=Path, help="exported .onnx or f32 .xml")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .xml")
    p.add_argument("--mode", choices=["int8-weights", "int4-weights", "int8"], required=True)
    p.add_argument("--int4", choices=["sym", "asym"], default="sym", help="int4-weights: INT4 kind")
    p.add_argument("--group-size", type=int, default=128, help="int4-weights: weights per scale")
    p.add_argument(
        "--table-bits",
        type=int,
        choices=[4, 8],
        default=8,
        help="int4-weights: the table in INT8 (default) or INT4 (groups of its row width)",
    )
    p.add_argument(
        "--precision", choices=["f32", "bf16"], default="f32", help="inference precision of what stays in float"
    )
    p.add_argument(
        "--calibration", type=Path, help="int8: .npz with input_ids [N,T] and hidden_states [N,T,G,D], or a text file"
    )
    p.add_argument(
        "--calibration-hidden", type=Path, help="int8 with a text --calibration: hidden states .npy [N,T,G,D]"
    )
    p.add_argument(
        "--calibration-text",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="int8: UTF-8 text files, tokenized with the model's tokenizer (--subset-size windows of "
        "--calibration-tokens ids; hidden states reach no quantized op)",
    )
    p.add_argument("--calibration-tokens", type=int, default=64, help="int8 with --calibration-text: ids per window")
    p.add_argument("--subset-size", type=int, default=300, help="int8: calibration sequences used")
    p.set_defaults(func=run)


def run(args) -> None:
    from engram_export.folders import calibration_for
    from engram_export.openvino.quantize import QuantizeOptions, compressed_constants, quantize

    check_at_least(
        1, group_size=args.group_size, subset_size=args.subset_size, calibration_tokens=args.calibration_tokens
    )
    texts = args.calibration_text or []
    check_output(
        args.output, args.model.is_dir(), ".xml", [args.model, args.calibration, args.calibration_hidden, *texts]
    )
    if args.mode != "int8" and (args.calibration or texts):
        raise EngramError(f"mode {args.mode} takes no calibration data (only int8 does)")
    calibration = None
    if args.mode == "int8":
        text = args.calibration is not None and args.calibration.suffix != ".npz"
        calibration = calibration_for(
            args.model,
            texts=texts,
            npz=None if text else args.calibration,
            text=args.calibration if text else None,
            hidden_npy=args.calibration_hidden,
            tokens=args.calibration_tokens,
            count=args.subset_size,
        )
    options = QuantizeOptions(
        args.mode,
        int4_symmetric=args.int4 == "sym",
        group_size=args.group_size,
        table_bits=args.table_bits,
        precision=args.precision,
        calibration=calibration,
        subset_size=args.subset_size,
    )
    if args.model.is_dir():
        from engram_export.folders import quantize_folder

        print(quantize_folder(args.model, args.output, options, write_options(args)))
        return
    output = quantize(args.model, args.output, options, write_options(args))
    from engram_export.openvino.extension import openvino_core

    stored = compressed_constants(openvino_core().read_model(str(output)))
    size = output.with_suffix(".bin").stat().st_size
    print(
        f"{output}: {args.mode}, .bin {size / 2**20:.0f} MiB, table stored as "
        f"{', '.join(stored['table']) or '-'}, projection as {', '.join(stored['projection']) or '-'}"
    )
