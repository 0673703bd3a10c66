"""``engram-export bench --config deepseek-v41``: a DeepSeek-V4.1 layer at the released size, measured.

Builds a sparse checkpoint with the released table sizes (``synthetic.py``: 101 GB logical per layer,
only the rows the benchmark looks up are written), then measures in one run:

- the costs that must not grow with the table: export, compile and load time, the bytes each writes
  beside the non-table weights, peak resident memory, and resident memory after load;
- per shape (B=50 with T=14 and T=1, fresh ids every call): the lookup, the fuse stage (after a
  prefetch), and a plain OpenVINO MatMul of the projection's shape and precision, the floor the fuse
  stage is measured against; for bf16 and INT8 weights.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from engram_export.verify import format_table

__all__ = ["run_bench_v41"]


def _own_bytes(folder: Path, shards: set[int]) -> int:
    """Bytes of the files in ``folder`` that are not hard links of the checkpoint's shards."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.stat().st_ino not in shards)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _median_ms(calls, repeat: int) -> float:
    """Median of ``repeat`` timed calls, each ``calls()`` returning a fresh zero-argument call."""
    times = []
    for _ in range(repeat):
        call = calls()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_bench_v41(config, workdir: Path, shapes: list[tuple[int, int]], repeat: int, quantize: bool) -> None:
    from engram_export.bench import _matmul_floor, cpu_summary, resident_mib
    from engram_export.folders import compile_folder, export_checkpoint, quantize_folder
    from engram_export.models.deepseek_v41 import V41Hashing
    from engram_export.quantize import QuantizeOptions
    from engram_export.runtime import EngramRuntime
    from engram_export.synthetic import write_v41_checkpoint

    print(f"CPU: {cpu_summary()}")
    layer = config.layer_ids[-1]
    rng = np.random.default_rng(0)
    rounds = {shape: [(rng.integers(0, config.compressed_vocab_size, shape), rng.random(shape) > 0.05)
                      for _ in range(repeat + 2)] for shape in shapes}
    hashing = V41Hashing(dataclasses.replace(config, tokenizer=None))  # the synthetic tokenizer maps id i to i
    rows = {lid: np.concatenate([hashing.rows(ids, mask, lid).ravel() for shape in shapes
                                 for ids, mask in rounds[shape]]) for lid in config.layer_ids}
    start = time.perf_counter()
    checkpoint = write_v41_checkpoint(workdir / "checkpoint", config.to_dict(), rows=rows, tokenizer=True)
    table_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e9
    print(f"sparse checkpoint: {table_gb:.0f} GB logical in {time.perf_counter() - start:.1f} s")
    shards = {p.stat().st_ino for p in checkpoint.glob("*.safetensors")}
    non_table = 2 * config.projection_width * config.embedding_width * 2 / 2**20  # bf16 wkv, MiB
    steps = []
    for name, make in (("export", lambda: export_checkpoint(checkpoint, workdir / "onnx")),
                       ("compile bf16", lambda: compile_folder(workdir / "onnx", workdir / "bf16", "bf16")),
                       *([("quantize int8-weights", lambda: quantize_folder(
                           workdir / "onnx", workdir / "int8", QuantizeOptions("int8-weights")))] if quantize else [])):
        start = time.perf_counter()
        folder = make()
        steps.append([name, f"{time.perf_counter() - start:.1f}", f"{_own_bytes(folder, shards) / 2**20:.0f}",
                      f"{_peak_gib():.2f}"])
    private, _ = resident_mib()
    start = time.perf_counter()
    runtimes = {"bf16": EngramRuntime(workdir / "bf16")}
    load_s = time.perf_counter() - start
    after = resident_mib()[0] - private
    if quantize:
        runtimes["int8-weights"] = EngramRuntime(workdir / "int8")
    print(f"\ncost of export, compile, load ({len(config.layer_ids)} layers; non-table weights as bf16: "
          f"{non_table:.0f} MiB):")
    print(format_table(steps + [["load bf16 folder", f"{load_s:.1f}", "-", f"{_peak_gib():.2f}"]],
                       ["step", "seconds", "MiB written (not table links)", "peak RSS GiB so far"]))
    print(f"resident memory added by loading: {after / 1024:.2f} GiB (private)")
    print(f"\nlayer {layer}, median of {repeat} calls, fresh ids each call (ms):")
    table = []
    for shape in shapes:
        hidden = rng.standard_normal((*shape, config.hc_mult, config.hidden_size), dtype=np.float32)
        floor = _matmul_floor(config.embedding_width, config.projection_width, "bf16")
        e = rng.standard_normal((shape[0] * shape[1], config.embedding_width), dtype=np.float32)
        floor_ms = _median_ms(lambda: lambda: floor(e), repeat)
        for name, runtime in runtimes.items():
            served = runtime.layer(layer)
            fresh = iter(rounds[shape] * 2)

            def lookup_call():
                ids, mask = next(fresh)
                return lambda: served.lookup(ids, mask)

            def fuse_call():
                handle = runtime.prefetch(*next(fresh))
                handle.wait()
                return lambda: served.fuse(handle, hidden)
            lookup_ms, fuse_ms = _median_ms(lookup_call, repeat), _median_ms(fuse_call, repeat)
            table.append([f"{shape[0]}x{shape[1]}", name, f"{lookup_ms:.2f}", f"{fuse_ms:.2f}", f"{floor_ms:.2f}",
                          f"{fuse_ms / floor_ms:.2f}"])
    print(format_table(table, ["BxT", "model", "lookup", "fuse stage", "MatMul floor bf16", "fuse / floor"]))
