"""``engram-export bench tiered --text FILE [...]``: DeepSeek-V4.1 tables in tiers, on real text.

The text is tokenized by the given tokenizer (the V4.1 preset takes its compression from it); the first
80% of the tokens calibrate (a hot set of ``HOT_SET``), the rest is served. Printed in one run, each
table from its own module:

1. hit rates of calibrated hot sets on the released layout (``tiered_hit_rates.py``);
2. rows for a GPU engine at each Engram layer's depth, decode and queued prefill, warm against tiered
   with and without candidates' reads (``tiered_depth.py``);
3. the CPU running the whole module at depth: resident, ``mmap`` cold and ``tiered`` with and without
   prefetch, decode and prefill (``tiered_serving.py``);
4. how to read a call's misses from a cold file (``tiered_reads.py``);
5. ``calibrate``'s speed on shuffled text (``tiered_calibrate_speed.py``; ``--calibrate-mib 0`` skips it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engram_export.core.text import read_text, token_stream
from engram_export.folders.calibration import calibrate
from engram_export.measure.common import split_held_out
from engram_export.measure.depth import backbone_layers as depth_layers
from engram_export.measure.tiered_calibrate_speed import calibration_speed
from engram_export.measure.tiered_depth import depth_tables
from engram_export.measure.tiered_hit_rates import hit_rate_tables
from engram_export.measure.tiered_reads import read_strategies
from engram_export.measure.tiered_serving import serving_table
from engram_export.measure.v41_text import compiled_v41, v41_with_tokenizer

__all__ = ["run_tiered_bench", "HOT_SET"]

HOT_SET = "48MiB"  # the hot rows of both layers


def _split_text(texts: list[Path], workdir: Path) -> tuple[Path, Path]:
    """The texts cut at 80% of their characters (on a paragraph break): (calibration, held-out) files."""
    return split_held_out("\n\n".join(read_text(path) for path in texts), workdir)


def run_tiered_bench(
    texts: list[Path],
    tokenizer: Path,
    workdir: Path,
    rows_per_layer: int,
    calibrate_mib: int = 256,
    backbone_layers: int | None = None,
    steps: int = 48,
    rounds: int = 2,
) -> None:
    """Print the tables (see the module) for ``texts``, tokenized by ``tokenizer``, in a backbone of
    ``backbone_layers`` layers (default: the config's)."""
    calibration, held_out = _split_text(texts, workdir)
    calibration_stream, held_out_stream = (token_stream(tokenizer, [path]) for path in (calibration, held_out))
    print(
        f"text: {', '.join(p.name for p in texts)}; {len(calibration_stream):,} tokens calibrate, "
        f"{len(held_out_stream):,} held out (the last 20% of the text)\n"
    )
    print(hit_rate_tables(v41_with_tokenizer(tokenizer), calibration_stream, held_out_stream))
    print()
    config = v41_with_tokenizer(tokenizer, rows_per_layer)
    compiled, tiered = compiled_v41(config, workdir), workdir / "tiered"
    shutil.rmtree(tiered, ignore_errors=True)
    calibrate(compiled, tiered, [calibration], HOT_SET)
    layers = depth_layers(config, backbone_layers)
    print(depth_tables(config, compiled, tiered, calibration_stream, held_out_stream, layers, steps, rounds))
    print()
    print(serving_table(config, tiered, held_out_stream, workdir, layers, steps, rounds))
    print()
    table = max((workdir / "checkpoint").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    print(read_strategies(table, workdir / "tiered", held_out_stream))
    if calibrate_mib:
        print()
        print(calibration_speed(workdir / "compiled", texts, workdir, calibrate_mib))
