"""``engram-export bench layer --config deepseek-v41`` (and ``bench decode``): a DeepSeek-V4.1 layer at
the released size, measured.

Builds a sparse checkpoint with the released table sizes (``synthetic.py``: 101 GB logical per layer,
only the rows the benchmark looks up are written), then measures in one run:

- the costs that must not grow with the table: export, compile and load time, the bytes each writes
  beside the non-table weights, peak resident memory, and resident memory after load;
- per shape (B=50 with T=14 and T=1, and B=1 T=1; fresh ids every call): the lookup, the fuse stage
  (after a prefetch), and a plain OpenVINO MatMul of the projection's shape and precision, the floor the
  fuse stage is measured against, timed round-robin; for bf16, INT8 weights and static INT8 (calibrated
  on windows of the benchmark's own random ids: the synthetic tokenizer has no prose to read, and
  calibration sets scales, not speed; accuracy on real text is held in the tests);
- decode: step latency and tokens/s for B in 1, 8, 50 against the stateless [B, 1] call.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path

import numpy as np
import openvino
from openvino import opset13 as ops

from engram_export.folders import compile_folder, export_checkpoint, quantize_folder
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.measure.common import (
    cpu_summary,
    decode_rows,
    format_table,
    matmul_floor,
    precision_label,
    resident_mib,
    round_robin_ms,
    target_line,
)
from engram_export.models.deepseek_v41_config import V41Hashing
from engram_export.openvino.precision import say_emulated
from engram_export.openvino.quantize import QuantizeOptions
from engram_export.openvino.tables import shared_constant
from engram_export.runtime import EngramRuntime

__all__ = ["run_bench_v41"]


def _own_bytes(folder: Path, shards: set[int]) -> int:
    """Bytes of the files in ``folder`` that are not hard links of the checkpoint's shards."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.stat().st_ino not in shards)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_bench_v41(
    config, workdir: Path, shapes: list[tuple[int, int]], repeat: int, quantize: bool, decode_only: bool = False
) -> None:
    """Print the tables above; ``decode_only`` (``bench decode``): the costs and the decode rows."""
    print(f"CPU: {cpu_summary()}")
    ran = say_emulated("bf16", "CPU", "bench")  # what the bf16 folder and floor run
    emulated = "" if ran == "bf16" else f"bf16 runs {ran} here"  # said beside the targets that read them
    shapes = list(dict.fromkeys([*shapes, (1, 1)]))  # B=1, T=1: the INT8 decode target
    layer = config.layer_ids[-1]
    rng = np.random.default_rng(0)
    rounds = {
        shape: [
            (rng.integers(0, config.compressed_vocab_size, shape), rng.random(shape) > 0.05) for _ in range(repeat + 2)
        ]
        for shape in shapes
    }
    hashing = V41Hashing(dataclasses.replace(config, tokenizer=None))  # the synthetic tokenizer maps id i to i
    rows = {
        lid: np.concatenate([hashing.rows(ids, mask, lid).ravel() for shape in shapes for ids, mask in rounds[shape]])
        for lid in config.layer_ids
    }
    start = time.perf_counter()
    checkpoint = write_v41_checkpoint(workdir / "checkpoint", config.to_dict(), rows=rows, tokenizer=True)
    table_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e9
    print(f"sparse checkpoint: {table_gb:.0f} GB logical in {time.perf_counter() - start:.1f} s")
    shards = {p.stat().st_ino for p in checkpoint.glob("*.safetensors")}
    non_table = 2 * config.projection_width * config.engram_hidden_size * 2 / 2**20  # bf16 wkv, MiB
    steps = []
    for name, make in (
        ("export", lambda: export_checkpoint(checkpoint, workdir / "onnx")),
        ("compile bf16", lambda: compile_folder(workdir / "onnx", workdir / "bf16", "bf16")),
        *(
            [
                (
                    "quantize int8-weights",
                    lambda: quantize_folder(workdir / "onnx", workdir / "int8", QuantizeOptions("int8-weights")),
                ),
                (
                    "quantize int8 (static)",
                    lambda: quantize_folder(
                        workdir / "onnx",
                        workdir / "int8_static",
                        QuantizeOptions("int8", calibration=_calibration(config, rounds[shapes[0]]), subset_size=8),
                    ),
                ),
            ]
            if quantize
            else []
        ),
    ):
        start = time.perf_counter()
        folder = make()
        steps.append(
            [
                name,
                f"{time.perf_counter() - start:.1f}",
                f"{_own_bytes(folder, shards) / 2**20:.0f}",
                f"{_peak_gib():.2f}",
            ]
        )
    private, _ = resident_mib()
    start = time.perf_counter()
    runtimes = {"bf16": EngramRuntime(workdir / "bf16")}
    load_s = time.perf_counter() - start
    after = resident_mib()[0] - private
    if quantize:
        runtimes["int8-weights"] = EngramRuntime(workdir / "int8")
        runtimes["int8"] = EngramRuntime(workdir / "int8_static")
    print(
        f"\ncost of export, compile, load ({len(config.layer_ids)} layers; non-table weights as bf16: "
        f"{non_table:.0f} MiB):"
    )
    print(
        format_table(
            steps + [["load bf16 folder", f"{load_s:.1f}", "-", f"{_peak_gib():.2f}"]],
            ["step", "seconds", "MiB written (not table links)", "peak RSS GiB so far"],
        )
    )
    print(f"resident memory added by loading: {after / 1024:.2f} GiB (private)")
    table, fuse_ms, floor_ms, checks = [], {}, {}, []
    if not decode_only:
        print(
            f"\nlayer {layer}, median of {repeat} rounds, fresh ids each call, the floor timed in the same rounds (ms):"
        )
        fp8_floor = _fp8_matmul(config.engram_hidden_size, config.projection_width)
    for shape in [] if decode_only else shapes:
        hidden = rng.standard_normal((*shape, config.hc_mult, config.hidden_size), dtype=np.float32)
        floor = matmul_floor(config.engram_hidden_size, config.projection_width, "bf16")
        e = rng.standard_normal((shape[0] * shape[1], config.engram_hidden_size), dtype=np.float32)
        calls: dict = {
            "floor": lambda _, floor=floor, e=e: lambda: floor(e),
            "fp8 floor": lambda _, e=e: lambda: fp8_floor(e),
        }
        for name, runtime in runtimes.items():
            served, fresh = runtime.layer(layer), iter(rounds[shape] * 2)

            def lookup_call(_, served=served, fresh=fresh):
                ids, mask = next(fresh)
                return lambda: served.lookup(ids, mask)

            def fuse_call(_, runtime=runtime, served=served, fresh=fresh, hidden=hidden):
                handle = runtime.prefetch(*next(fresh))
                handle.wait()
                return lambda: served.fuse(handle, hidden)

            calls[name, "lookup"], calls[name, "fuse"] = lookup_call, fuse_call
        medians = round_robin_ms(calls, repeat)
        floor_ms[shape] = medians["floor"]
        table.append(
            [
                f"{shape[0]}x{shape[1]}",
                "MatMul, FP8 weights",
                "",
                f"{medians['fp8 floor']:.2f}",
                f"{medians['floor']:.2f}",
                f"{medians['fp8 floor'] / medians['floor']:.2f}",
            ]
        )
        for name in runtimes:
            fuse_ms[shape, name] = medians[name, "fuse"]
            table.append(
                [
                    f"{shape[0]}x{shape[1]}",
                    precision_label(name),
                    f"{medians[name, 'lookup']:.2f}",
                    f"{medians[name, 'fuse']:.2f}",
                    f"{medians['floor']:.2f}",
                    f"{medians[name, 'fuse'] / medians['floor']:.2f}",
                ]
            )
    if table:
        headers = ["BxT", "model", "lookup", "fuse stage", f"MatMul floor {precision_label('bf16')}", "fuse / floor"]
        print(format_table(table, headers))
    checks += [
        (f"bf16 fuse / floor at {b}x{t} <= 1.15", fuse_ms[(b, t), "bf16"] / floor_ms[b, t], 1.15, emulated)
        for b, t in floor_ms
        if b == 50
    ]
    if ((50, 14), "int8") in fuse_ms:
        checks.append(
            (
                "static int8 fuse faster than bf16 at 50x14 >= 1.5x",
                fuse_ms[(50, 14), "bf16"] / fuse_ms[(50, 14), "int8"],
                -1.5,
                emulated,
            )
        )
    if ((1, 1), "int8-weights") in fuse_ms:
        checks.append(
            (
                "int8-weights fuse faster than bf16 at 1x1 >= 1.8x",
                fuse_ms[(1, 1), "bf16"] / fuse_ms[(1, 1), "int8-weights"],
                -1.8,
                emulated,
            )
        )
    step_b1 = {}
    for name, runtime in runtimes.items():
        decoded = decode_rows(runtime.layer(layer), (1, 8, 50), repeat)
        step_b1[name] = float(decoded[0][1])
        print(f"\ndecode, layer {layer}, {precision_label(name)}: median of {repeat} rounds")
        print(format_table(decoded, ["B", "step ms", "stateless [B,1] ms", "step / stateless", "tokens/s"]))
        checks.append(
            (
                f"{name} decode step / stateless [B,1] call <= 1.3 (worst of B = 1, 8, 50)",
                max(float(row[3]) for row in decoded),
                1.3,
                emulated if name == "bf16" else "",
            )
        )
    if "int8" in step_b1:
        checks.append(
            (
                "static int8 decode step at B=1 / int8-weights' <= 1.0",
                step_b1["int8"] / step_b1["int8-weights"],
                1.0,
                "",
            )
        )
    print("\ntargets (ratios from this run):")
    print(*(target_line(*check) for check in checks), sep="\n")


def _calibration(config, rounds) -> list[dict]:
    """Calibration items (batch 1): the first sequence of each of the first 8 rounds of benchmark ids,
    every token unmasked, seeded hidden states."""
    rng, items = np.random.default_rng(1), []
    for ids, _ in rounds[:8]:
        shape = (1, ids.shape[1])
        hidden = rng.standard_normal((*shape, config.hc_mult, config.hidden_size), dtype=np.float32)
        items.append({"input_ids": ids[:1], "token_mask": np.ones(shape, bool), "hidden_states": hidden})
    return items


def _fp8_matmul(width_in: int, width_out: int):
    """A MatMul of the projection's shape with FP8 E4M3 weights and a scale per output channel, in bf16:
    what OpenVINO does with FP8 weights on this CPU (it decompresses them with a Convert and a Multiply
    on every call instead of reading them inside its GEMM kernel)."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (width_out, width_in), dtype=np.uint8) & 0x77  # no NaN codes
    weights = shared_constant(codes, codes, "f8e4m3", [width_out, width_in])
    scale = ops.constant(rng.uniform(1e-3, 1e-2, (width_out, 1)).astype(np.float32))
    x = ops.parameter([-1, width_in], np.float32, name="x")
    model = openvino.Model([ops.matmul(x, ops.multiply(ops.convert(weights, np.float32), scale), False, True)], [x])
    request = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}).create_infer_request()
    return lambda x: request.infer([x])
