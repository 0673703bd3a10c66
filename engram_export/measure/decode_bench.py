"""``engram-export bench decode``: the serving numbers of one Engram layer, measured in one run.

- decode step latency (stateful, one token per sequence) against the same layer's stateless call on
  [B, 1] (what the state costs), and tokens/s, for B in {1, 8, 50};
- throughput of independent [B, T] requests through ``openvino.AsyncInferQueue`` with the LATENCY
  hint (1 stream) and the THROUGHPUT hint with 2 streams, and one ``EngramRuntime`` shared by 1 and 2
  threads;
- prefetch: the lookup started with a stand-in backbone (a PyTorch matmul chain of ``--backbone-layers``
  layers that takes longer than the lookup in all), the layer fused at its depth (after the backbone
  layers before it), against running the layers before it, lookup and fuse, and the rest in turn.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino
import torch

from engram_export.core.errors import EngramError
from engram_export.measure.common import (
    cpu_summary,
    decode_rows,
    format_table,
    precision_label,
    random_calibration,
    random_inputs,
)
from engram_export.onnx.export import export_layer
from engram_export.openvino.compile import compile_onnx, read_openvino
from engram_export.openvino.extension import openvino_core
from engram_export.openvino.precision import say_emulated
from engram_export.openvino.quantize import QuantizeOptions, quantize
from engram_export.runtime import EngramRuntime

__all__ = ["run_decode_bench", "decode_bench", "throughput_rows", "shared_runtime_rows", "prefetch_rows"]

DEFAULT_BACKBONE_LAYERS = 40  # where neither the config nor --backbone-layers says: DeepSeek-V4.1's


def _median_ms(call, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def throughput_rows(xml: Path, precision: str, batch: int, tokens: int, requests: int) -> list[list]:
    """Independent requests through AsyncInferQueue: LATENCY (1 stream) vs THROUGHPUT (2 streams)."""
    rows = []
    for hint, streams in (("LATENCY", 1), ("THROUGHPUT", 2)):
        model, info = read_openvino(xml)
        compiled = openvino_core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "NUM_STREAMS": streams}
        )
        jobs = openvino.AsyncInferQueue(compiled, streams)
        ids, hidden = random_inputs(info.config, info.num_ids, batch, tokens, seed=3)
        for _ in range(streams):
            jobs.start_async({"input_ids": ids, "hidden_states": hidden})
        jobs.wait_all()
        start = time.perf_counter()
        for _ in range(requests):
            jobs.start_async({"input_ids": ids, "hidden_states": hidden})
        jobs.wait_all()
        seconds = time.perf_counter() - start
        rows.append(
            [
                f"{hint}, {streams} stream{'s' if streams > 1 else ''}",
                f"{requests / seconds:.1f}",
                f"{requests * batch * tokens / seconds:.0f}",
            ]
        )
    return rows


def shared_runtime_rows(xml: Path, batch: int, tokens: int, requests: int, rounds: int = 5) -> list[list]:
    """One ``EngramRuntime`` called by 1, then 2 threads at once (each call on its own requests), with
    the default LATENCY hint and with the THROUGHPUT hint (``ov_config``): ``rounds`` alternating
    rounds of ``requests`` calls each, medians (this machine's speed drifts by 20% within a minute)."""
    rows = []
    for hint in ("LATENCY", "THROUGHPUT"):
        runtime = EngramRuntime(xml, ov_config={"PERFORMANCE_HINT": hint})
        ids, hidden = random_inputs(runtime.config, runtime.info.num_ids, batch, tokens, seed=5)
        rates: dict[int, list[float]] = {1: [], 2: []}
        with ThreadPoolExecutor(2) as pool:

            def call(_, runtime=runtime, ids=ids, hidden=hidden):
                return runtime(ids, hidden)

            list(pool.map(call, range(4)))  # warm-up
            for _ in range(rounds):
                for threads in (1, 2):
                    start = time.perf_counter()
                    list(pool.map(call, range(requests))) if threads == 2 else [
                        runtime(ids, hidden) for _ in range(requests)
                    ]
                    rates[threads].append(requests / (time.perf_counter() - start))
        base = statistics.median(rates[1])
        for threads in (1, 2):
            rate = statistics.median(rates[threads])
            rows.append([hint, threads, f"{rate:.1f}", f"{rate * batch * tokens:.0f}", f"{rate / base:.2f}"])
    return rows


def prefetch_rows(runtime, batch: int, tokens: int, repeat: int, backbone_layers: int) -> list[list]:
    """How much of the lookup a prefetch hides when the layer sits at its depth in a backbone that takes
    longer than the lookup in all: the lookup starts with the backbone's first layer, the layer (its id,
    e.g. 1) needs its rows once the backbone layers before it ran.

    Every round uses fresh ids (the table rows are not in cache, as with new tokens). Hidden share:
    1 - (time still spent waiting for the lookup when the backbone reached the layer) / (lookup alone)."""
    depth = runtime.info.layer_id
    if not 0 <= depth < backbone_layers:
        raise EngramError(f"layer {depth} does not fit a backbone of {backbone_layers} layers: give --backbone-layers")
    rounds = [
        random_inputs(runtime.config, runtime.info.num_ids, batch, tokens, seed=100 + i) for i in range(3 * repeat + 6)
    ]
    fresh = iter(rounds)

    def lookup_alone():
        runtime.prefetch(next(fresh)[0]).wait()

    lookup_ms = _median_ms(lookup_alone, repeat)
    weight, activations = torch.randn(512, 512), torch.randn(256, 512)
    matmul_ms = max(_median_ms(lambda: activations @ weight, repeat), 1e-3)
    per_layer = max(1, int(np.ceil(2 * lookup_ms / backbone_layers / matmul_ms)))

    def backbone(first: int, last: int):
        x = activations
        for _ in range((last - first) * per_layer):
            x = torch.tanh(x @ weight)

    backbone_ms = _median_ms(lambda: backbone(0, backbone_layers), repeat)
    serial, overlapped, exposed = [], [], []
    for _ in range(repeat):
        ids, hidden = next(fresh)
        start = time.perf_counter()
        backbone(0, depth)
        runtime(ids, hidden)
        backbone(depth, backbone_layers)
        serial.append(time.perf_counter() - start)
        ids, hidden = next(fresh)
        start = time.perf_counter()
        handle = runtime.prefetch(ids)
        backbone(0, depth)
        waited = time.perf_counter()
        handle.wait()
        exposed.append(time.perf_counter() - waited)
        runtime.fuse(handle, hidden)
        backbone(depth, backbone_layers)
        overlapped.append(time.perf_counter() - start)
    exposed_ms = statistics.median(exposed) * 1e3
    return [
        ["lookup alone (fresh ids)", f"{lookup_ms:.2f}"],
        [f"backbone stand-in, {backbone_layers} layers", f"{backbone_ms:.2f}"],
        [f"backbone layers before the Engram layer ({depth})", f"{backbone_ms * depth / backbone_layers:.2f}"],
        ["serial: layers before, lookup + fuse, layers after", f"{statistics.median(serial) * 1e3:.2f}"],
        ["overlapped: prefetch, layers before, fuse, layers after", f"{statistics.median(overlapped) * 1e3:.2f}"],
        ["lookup still exposed when the backbone reaches the layer", f"{exposed_ms:.2f}"],
        ["share of the lookup hidden", f"{1 - exposed_ms / lookup_ms:.0%}"],
    ]


def run_decode_bench(files: dict, batches=(1, 8, 50), repeat: int = 20, backbone_layers: int | None = None) -> None:
    """``files``: name -> compiled .xml of one optimized layer (e.g. bf16, int8); a precision's name is
    printed with the precision that runs (``bf16 (runs f32 here)`` on a CPU without BF16)."""
    for name, xml in files.items():
        runtime = EngramRuntime(xml)
        print(f"\ndecode, one layer, {precision_label(name)} ({runtime.settings}): median of {repeat} rounds")
        print(
            format_table(
                decode_rows(runtime, batches, repeat),
                ["B", "step ms", "stateless [B,1] ms", "step / stateless", "tokens/s"],
            )
        )
    first_name, first = next(iter(files.items()))
    label = precision_label(first_name)
    runtime = EngramRuntime(first)
    print(f"\nthroughput, {label}, independent [50, 14] requests through AsyncInferQueue:")
    print(
        format_table(throughput_rows(first, runtime.precision, 50, 14, 4 * repeat), ["hint", "requests/s", "tokens/s"])
    )
    print(f"\nthreads sharing one EngramRuntime, {label}, [50, 14] calls:")
    print(
        format_table(
            shared_runtime_rows(first, 50, 14, repeat), ["hint", "threads", "requests/s", "tokens/s", "vs 1 thread"]
        )
    )
    layers = backbone_layers or runtime.config.num_hidden_layers or DEFAULT_BACKBONE_LAYERS
    print(f"\nprefetch, {label}, B=50, T=14, Engram layer {runtime.info.layer_id} of {layers} (ms, medians):")
    print(format_table(prefetch_rows(runtime, 50, 14, repeat, layers), ["what", "ms"]))


def decode_bench(layer, workdir: Path, with_int8: bool, repeat: int, backbone_layers: int | None = None) -> None:
    """Export and compile ``layer`` (bf16, and static int8 if asked) into ``workdir``, then time it."""
    say_emulated("bf16", "CPU", "bench decode")
    onnx_path = export_layer(layer, workdir / "engram.onnx")
    files = {"bf16": compile_onnx(onnx_path, workdir / "engram_bf16.xml", "bf16")}
    if with_int8:
        calibration = random_calibration(layer.config, len(layer.hashing.lut))
        files["int8"] = quantize(
            onnx_path, workdir / "engram_int8.xml", QuantizeOptions("int8", calibration=calibration)
        )
    print(f"CPU: {cpu_summary()}")
    run_decode_bench(files, repeat=repeat, backbone_layers=backbone_layers)
