"""``engram-export``: export, compile, run and verify Engram layers from the command line.

One ``add_*`` function per subcommand declares its arguments; its ``run_*`` function imports torch,
OpenVINO or ONNX Runtime only when called, so ``--help`` stays instant. Any ``EngramError`` (bad input,
file or config) is printed as one line and exits with code 2; ``main`` turns any other error into one
line too (``--debug`` prints the trace), and Ctrl-C into one line and exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from engram_export.errors import EngramError, one_line
from engram_export.fileio import STAGING_PREFIX, check_output_file, check_output_folder

__all__ = ["main"]


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
    with _stage(f"building layer {args.layer} ({'random' if args.random_init else args.weights})"):
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


def _stage(what):
    from engram_export.progress import stage

    return stage(what)


# export ---------------------------------------------------------------------------------------------
def add_export(sub) -> None:
    p = sub.add_parser("export", help="trace Engram layers to ONNX (hash-gather as one custom node)")
    add_layer_source(p, checkpoint=True)
    add_copy_table(p)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output .onnx file; without --layer, a folder for every layer with a manifest",
    )
    p.add_argument("--no-optimize", action="store_true", help="keep the raw trace (no graph passes)")
    p.set_defaults(func=run_export)


def add_copy_table(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--copy-table",
        action="store_true",
        help="DeepSeek-V4.1: copy the table shards where no hard link can be made "
        "(another file system) instead of refusing",
    )


def run_export(args) -> None:
    from engram_export.onnx.export import export_layer

    check_output(args.output, args.layer is None, ".onnx", [args.weights, args.checkpoint])
    if args.checkpoint is not None:
        from engram_export.folders import export_checkpoint

        if args.config is not None:
            raise EngramError("--checkpoint brings its own config.json: drop --config")
        print(export_checkpoint(args.checkpoint, args.output, args.layer, args.copy_table))
        return
    from engram_export.models.config import is_deepseek_v41, load_config

    if args.config is None:
        raise EngramError("give --config (a preset or JSON file) or --checkpoint")
    config = load_config(args.config)
    if is_deepseek_v41(config):
        print(export_random_v41(config, args))
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


def export_random_v41(config, args) -> Path:
    """A DeepSeek-V4.1 config with --random-init: a synthetic checkpoint (``synthetic.py``) written
    beside the output and exported; its shards live on only as the output's hard links."""
    from engram_export.folders import export_checkpoint
    from engram_export.synthetic import write_v41_checkpoint

    if not args.random_init:
        raise EngramError(
            "DeepSeek-V4.1 layers are exported from their checkpoint folder: use "
            "--checkpoint DIR (or --config with --random-init)"
        )
    small = all(config.table_rows(layer) * config.head_dim <= 2**30 for layer in config.layer_ids)
    rows = None if small else {layer: [] for layer in config.layer_ids}
    if not small:
        print("engram-export: random-init tables this large are left sparse (rows of zeros)", file=sys.stderr)
    # named like a staging folder, so that the next run here removes it if this one is killed
    scratch_prefix = f"{STAGING_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=scratch_prefix, dir=args.output.parent) as scratch:
        checkpoint = write_v41_checkpoint(
            Path(scratch) / "checkpoint", config.to_dict(), seed=args.seed, rows=rows, tokenizer=True
        )
        return export_checkpoint(checkpoint, args.output, args.layer, args.copy_table)


# optimize -------------------------------------------------------------------------------------------
def add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="run the graph passes on an exported .onnx")
    p.add_argument("model", type=Path, help="exported .onnx")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx file")
    p.set_defaults(func=run_optimize)


def run_optimize(args) -> None:
    import collections

    from engram_export.onnx.export import load_onnx, save_onnx
    from engram_export.passes import optimize

    check_output_file(args.output, ".onnx", [args.model])
    model = load_onnx(args.model)
    before = collections.Counter(node.op_type for node in model.graph)
    with _stage("optimizing the graph"):
        result = optimize(model)
    after = collections.Counter(node.op_type for node in model.graph)
    save_onnx(model, args.output)
    print(f"nodes: {sum(before.values())} -> {sum(after.values())}{'' if result.modified else ' (nothing to fuse)'}")
    for op in sorted(set(before) | set(after), key=lambda op: -before[op]):
        if before[op] != after[op]:
            print(f"  {op:20s} {before[op]:4d} -> {after[op]}")
    print(args.output)


# compile --------------------------------------------------------------------------------------------
def add_compile(sub) -> None:
    p = sub.add_parser("compile", help="convert an exported .onnx (or folder) to OpenVINO IR for CPU")
    p.add_argument("model", type=Path, help="exported .onnx, or a folder from export without --layer")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="output .xml (the .bin goes beside), or a folder for a folder"
    )
    add_copy_table(p)
    p.set_defaults(func=run_compile)


def run_compile(args) -> None:
    check_output(args.output, args.model.is_dir(), ".xml", [args.model])
    if args.model.is_dir():
        from engram_export.folders import compile_folder

        print(compile_folder(args.model, args.output, args.precision, args.copy_table))
        return
    from engram_export.openvino.compile import compile_onnx

    print(compile_onnx(args.model, args.output, args.precision, args.copy_table))


# quantize -------------------------------------------------------------------------------------------
def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="NNCF: INT8/INT4 weights or static INT8, table compressed per row")
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
    p.add_argument("--subset-size", type=int, default=64, help="int8: calibration sequences used")
    add_copy_table(p)
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> None:
    from engram_export.openvino.quantize import (
        QuantizeOptions,
        calibration_from_text,
        compressed_constants,
        quantize,
        read_calibration,
        read_model,
    )

    check_at_least(
        1, group_size=args.group_size, subset_size=args.subset_size, calibration_tokens=args.calibration_tokens
    )
    texts = args.calibration_text or []
    check_output(
        args.output, args.model.is_dir(), ".xml", [args.model, args.calibration, args.calibration_hidden, *texts]
    )
    calibration = None
    if args.mode != "int8" and (args.calibration or texts):
        raise EngramError(f"mode {args.mode} takes no calibration data (only int8 does)")
    if args.mode == "int8":
        if (args.calibration is None) == (not texts):
            raise EngramError(
                "mode int8 needs calibration data: --calibration-text FILE [...], or --calibration (an .npz, "
                "or a text file with --calibration-hidden)"
            )
        source = args.model  # a folder's layers share the config: calibrate from its first file
        if source.is_dir():
            from engram_export.manifest import read_manifest

            source = source / next(iter(read_manifest(source, check_hashes=False).layers.values()))
        _, info = read_model(source)
        if texts:
            calibration = calibration_from_text(info, texts, args.calibration_tokens, args.subset_size)
        else:
            text = args.calibration.suffix != ".npz"
            calibration = read_calibration(
                info.config,
                info.num_ids,
                npz=None if text else args.calibration,
                text=args.calibration if text else None,
                hidden_npy=args.calibration_hidden,
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

        print(quantize_folder(args.model, args.output, options, args.copy_table))
        return
    output = quantize(args.model, args.output, options, args.copy_table)
    from engram_export.openvino.extension import openvino_core

    stored = compressed_constants(openvino_core().read_model(str(output)))
    size = output.with_suffix(".bin").stat().st_size
    print(
        f"{output}: {args.mode}, .bin {size / 2**20:.0f} MiB, table stored as "
        f"{', '.join(stored['table']) or '-'}, projection as {', '.join(stored['projection']) or '-'}"
    )


# run ------------------------------------------------------------------------------------------------
def add_run(sub) -> None:
    p = sub.add_parser("run", help="run a model on input_ids and hidden_states from an .npz")
    p.add_argument("model", type=Path, help=".xml (OpenVINO) or .onnx")
    p.add_argument(
        "--inputs",
        type=Path,
        required=True,
        help=".npz with input_ids and hidden_states (and, for DeepSeek-V4.1, token_mask)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help=".npz to write 'output' to")
    p.add_argument("--runtime", choices=["ov", "ort"], default="ov")
    p.add_argument(
        "--precision", choices=["f32", "bf16"], default=None, help="OpenVINO inference precision (default: the model's)"
    )
    p.add_argument("--layer", type=int, help="with a model folder: the layer to run")
    p.set_defaults(func=run_run)


def run_run(args) -> None:
    import numpy as np

    from engram_export.fileio import load_npz, staged_output
    from engram_export.runtime import EngramRuntime

    check_output_file(args.output, ".npz", [args.model, args.inputs])
    inputs = load_npz(args.inputs, ("input_ids", "hidden_states"), optional=("token_mask",))
    runtime = EngramRuntime(args.model, runtime=args.runtime, precision=args.precision)
    if args.layer is not None or args.model.is_dir():
        if args.layer is None:
            raise EngramError(f"{args.model} serves layers {runtime.layer_ids}: give --layer")
        runtime = runtime.layer(args.layer)
    output = runtime(inputs["input_ids"], inputs["hidden_states"], inputs.get("token_mask"))
    with staged_output(args.output) as staged:
        np.savez(staged, output=output)
    print(f"{args.output}: output {list(output.shape)} from {runtime}")


# verify ---------------------------------------------------------------------------------------------
def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="compare PyTorch, ONNX Runtime, OpenVINO f32 and bf16")
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
    p.set_defaults(func=run_verify)


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


def verify_layer(layer, workdir: Path, onnx_path: Path | None, shapes, extra=(), export=None) -> bool:
    """Export (unless given; with ``export(path)`` if given), compile f32 and bf16, compare every path
    (and ``extra`` .xml files); prints the table and a loud line for each failure."""
    from engram_export.measure.verify import (
        comparisons_table,
        default_paths,
        failures_summary,
        verify_paths,
        verify_paths_v41,
    )
    from engram_export.models.config import is_deepseek_v41
    from engram_export.onnx.export import export_layer
    from engram_export.openvino.compile import compile_onnx

    if onnx_path is None:
        onnx_path = (export or (lambda path: export_layer(layer, path)))(workdir / "engram.onnx")
    xml = {p: compile_onnx(onnx_path, workdir / f"engram_{p}.xml", p) for p in ("f32", "bf16")}
    names = [path.name for path in extra]  # two quantized folders both hold layer_3.xml: label by path
    xml.update({path.name if names.count(path.name) == 1 else str(path): path for path in extra})
    with _stage(f"running every path at {', '.join(f'{b}x{t}' for b, t in shapes)}"):
        verify = verify_paths_v41 if is_deepseek_v41(layer.config) else verify_paths
        results = verify(layer, default_paths(onnx_path, xml), shapes)
    print(comparisons_table(results))
    failed = failures_summary(results)
    print("\n".join(failed))
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return not failed


def run_verify(args) -> int:
    shapes = parse_shapes(args.shape)
    check_workdir(args.workdir)
    if args.workdir is not None:  # what verify_layer writes there must not overwrite an input
        written = ["engram_f32.xml", "engram_bf16.xml"] + ([] if args.onnx else ["engram.onnx"])
        for name in written:
            check_output_file(args.workdir / name, Path(name).suffix, [args.onnx, *args.model])
    export = None
    if args.checkpoint is not None:  # DeepSeek-V4.1: the layer reads the checkpoint, tables mapped
        from engram_export.checkpoint import Checkpoint
        from engram_export.folders import export_checkpoint
        from engram_export.models.deepseek_v41 import V41Config, open_layer

        if args.layer is None:
            raise EngramError("give --layer (one of the checkpoint's engram_layer_ids)")
        checkpoint = Checkpoint(args.checkpoint)
        layer = open_layer(checkpoint, V41Config.from_checkpoint(checkpoint), args.layer)
        export = lambda path: export_checkpoint(args.checkpoint, path, args.layer)  # noqa: E731
    else:
        layer = layer_from_args(args)
    with working_folder(args.workdir, "engram-verify-") as workdir:
        return 0 if verify_layer(layer, workdir, args.onnx, shapes, args.model, export) else 1


# demo -----------------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="deepseek-demo preset, random weights: export, compile, verify")
    p.add_argument(
        "--engram-vocab-size",
        type=int,
        default=None,
        help="base table size per n-gram order (default: the demo's 646400 = 10.3M rows)",
    )
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from engram_export.models.config import load_config
    from engram_export.models.weights import build_layer

    check_workdir(args.workdir)
    config = with_table_size(load_config("deepseek-demo"), args.engram_vocab_size)
    start = time.perf_counter()
    with _stage(f"random weights for layer {args.layer} of deepseek-demo"):
        layer = build_layer(config, args.layer, seed=0)
    rows = layer.multi_head_embedding.embedding.weight.shape[0]
    print(
        f"deepseek-demo layer {args.layer}: table {rows:,} x {config.head_dim} "
        f"({rows * config.head_dim * 4 / 2**30:.2f} GiB f32), D={config.hidden_size}, "
        f"G={config.hc_mult}, heads={config.num_heads}"
    )
    with working_folder(args.workdir, "engram-demo-") as workdir:
        ok = verify_layer(layer, workdir, None, [(50, 14), (1, 1), (3, 17)])
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


# extension ------------------------------------------------------------------------------------------
def add_extension(sub) -> None:
    p = sub.add_parser("extension", help="print the path of the OpenVINO extension library (built if needed)")
    p.set_defaults(func=run_extension)


def run_extension(args) -> None:
    from engram_export.openvino.extension import library_path

    print(library_path())


# bench ----------------------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time PyTorch, ONNX Runtime and OpenVINO side by side")
    p.add_argument("--config", default="deepseek-demo", help="preset or JSON config")
    p.add_argument("--weights", type=Path, help="checkpoint (default: random weights, seed 0)")
    p.add_argument("--prefix", default="")
    p.add_argument("--layer", type=int, help="layer id (default: the config's first)")
    p.add_argument("--engram-vocab-size", type=int, help="override the table size per n-gram order")
    p.add_argument("--batch", type=int, help="one workload of this batch (with --tokens)")
    p.add_argument("--tokens", type=int, help="one workload of this many tokens")
    p.add_argument("--precision", choices=["f32", "bf16", "all"], default="all")
    p.add_argument("--repeat", type=int, default=20, help="timed rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--modes",
        default="int8-weights,int4-weights,int8",
        help="NNCF modes to quantize and time (comma-separated, or 'none')",
    )
    p.add_argument("--profile", action="store_true", help="also print OpenVINO per-node times")
    p.add_argument(
        "--lookup",
        action="store_true",
        help="only the lookup table: every stored table form, row kernel against OpenVINO",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="serving numbers instead: decode steps for B in 1, 8, 50 (bf16 and int8), "
        "throughput with 1 and 2 streams, prefetch against serial",
    )
    p.add_argument("--workdir", type=Path, help="keep the exported files here")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args) -> None:
    # PyTorch's OpenMP threads otherwise spin on the cores after each eager call, slowing whichever
    # row comes next (measured: a bf16 MatMul floor at B=50 T=1 took 1.8x as long right after one)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from engram_export.measure.bench import run_bench
    from engram_export.measure.bench_lookup import print_targets, run_lookup_bench, shapes_for
    from engram_export.measure.decode_bench import decode_bench
    from engram_export.models.config import is_deepseek_v41, load_config
    from engram_export.models.weights import build_layer

    if (args.batch is None) != (args.tokens is None):
        raise EngramError("give --batch and --tokens together (default: 50x14 and 50x1)")
    check_at_least(1, batch=args.batch, tokens=args.tokens, repeat=args.repeat)
    check_at_least(0, warmup=args.warmup)
    shapes = [(args.batch, args.tokens)] if args.batch is not None else [(50, 14), (50, 1)]
    check_workdir(args.workdir)
    config = load_config(args.config)
    modes = [] if args.modes == "none" else args.modes.split(",")
    if is_deepseek_v41(config):  # the released size from a sparse checkpoint
        from engram_export.measure.bench_v41 import run_bench_v41

        if args.weights or args.engram_vocab_size or args.lookup:
            raise EngramError(
                "bench of a DeepSeek-V4.1 config builds its own sparse checkpoint: drop "
                "--weights, --engram-vocab-size and --lookup"
            )
        with working_folder(args.workdir, "engram-bench-") as workdir:
            run_bench_v41(config, workdir, shapes, args.repeat, "int8-weights" in modes, decode_only=args.decode)
        return
    config = with_table_size(config, args.engram_vocab_size)
    if args.lookup:
        with working_folder(args.workdir, "engram-bench-") as workdir:
            print_targets(run_lookup_bench(workdir, shapes, args.repeat, args.warmup, shapes_for(config)))
        return
    precisions = ["f32", "bf16"] if args.precision == "all" else [args.precision]
    unknown = sorted(set(modes) - {"int8-weights", "int4-weights", "int8"})
    if unknown:
        raise EngramError(f"unknown quantization mode(s) {', '.join(unknown)}")
    layer_id = config.layer_ids[0] if args.layer is None else args.layer
    with _stage(f"building layer {layer_id}"):
        layer = build_layer(
            config, layer_id, weights=args.weights, prefix=args.prefix, seed=None if args.weights else 0
        )
    with working_folder(args.workdir, "engram-bench-") as workdir:
        if args.decode:
            decode_bench(layer, workdir, "int8" in modes, args.repeat)
        else:
            run_bench(layer, workdir, shapes, precisions, args.repeat, args.warmup, args.profile, modes)
            print_targets(run_lookup_bench(workdir, shapes, args.repeat, args.warmup, shapes_for(config)))


# main -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-export", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--debug", action="store_true", help="print the trace of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_export,
        add_optimize,
        add_compile,
        add_quantize,
        add_run,
        add_verify,
        add_demo,
        add_bench,
        add_extension,
    ):
        add(sub)
    return parser


def error_line(exc: BaseException, command: str) -> tuple[str, int]:
    """The message and exit code for an error that reached ``main``: 2 for what the user can fix
    (an input, a path, the memory asked for), 130 for Ctrl-C, 1 for anything else (a bug)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, EngramError):
        return str(exc), 2
    if isinstance(exc, OSError):  # a path that cannot be read or written (space, permission, name length)
        where = f"{exc.filename}: " if exc.filename else f"{command} failed: "
        return f"{where}{exc.strerror or exc}", 2
    if isinstance(exc, MemoryError):
        return f"{command} failed: out of memory (a smaller table or batch may fit)", 2
    return f"{command} failed: {type(exc).__name__}: {one_line(exc)} (run with --debug for the trace)", 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"-q", "--quiet", "--debug"}  # accepted before or after the command
    args = build_parser().parse_args([a for a in argv if a not in flags])
    try:
        import logging

        from engram_export.progress import LOGGER, TerminalHandler

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        progress_log = logging.getLogger(LOGGER)
        progress_log.handlers[:] = [TerminalHandler(sys.stderr)]
        progress_log.propagate = False
        progress_log.setLevel(logging.WARNING if {"-q", "--quiet"} & set(argv) else logging.INFO)
        return args.func(args) or 0
    except (KeyboardInterrupt, Exception) as exc:  # a last line of defence: one line, never a trace
        message, code = error_line(exc, args.command)
        if "--debug" in argv:
            import traceback

            traceback.print_exception(exc)
    print(f"engram-export: {'' if code == 130 else 'error: '}{' '.join(message.splitlines())}", file=sys.stderr)
    return code
