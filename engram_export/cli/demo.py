"""engram-export demo: the deepseek-demo preset with random weights, exported, compiled, verified."""

from __future__ import annotations

import time
from pathlib import Path

from engram_export.cli.common import FLAGS, check_workdir, stage, with_table_size, working_folder

__all__ = ["add", "run"]


def add(sub) -> None:
    p = sub.add_parser("demo", parents=[FLAGS], help="deepseek-demo preset, random weights: export, compile, verify")
    p.add_argument(
        "--engram-vocab-size",
        type=int,
        default=None,
        help="base table size per n-gram order (default: the demo's 646400 = 10.3M rows)",
    )
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from engram_export.models.config import load_config
    from engram_export.models.weights import build_layer

    check_workdir(args.workdir)
    config = with_table_size(load_config("deepseek-demo"), args.engram_vocab_size)
    start = time.perf_counter()
    with stage(f"random weights for layer {args.layer} of deepseek-demo"):
        layer = build_layer(config, args.layer, seed=0)
    rows = layer.multi_head_embedding.embedding.weight.shape[0]
    print(
        f"deepseek-demo layer {args.layer}: table {rows:,} x {config.head_dim} "
        f"({rows * config.head_dim * 4 / 2**30:.2f} GiB f32), D={config.hidden_size}, "
        f"G={config.hc_mult}, heads={config.num_heads}"
    )
    from engram_export.cli.verify import report
    from engram_export.measure.verify import verify_layer

    with working_folder(args.workdir, "engram-demo-") as workdir:
        ok = report(verify_layer(layer, workdir, None, [(50, 14), (1, 1), (3, 17)]))
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1
