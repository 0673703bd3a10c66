"""``engram-export bench layer``: every runtime path timed side by side, in one run, on the same inputs.

Rows are timed round-robin (one call of each row per round, after warm-up), so noise on a shared
machine hits every row alike; the table shows medians and each row's speed-up over PyTorch eager fp32
(the demo layout). The floor rows run only one MatMul of the fused projection's shape
([B*T, E] x [E, (G+1)*D]) in OpenVINO at the same precision: what the projections' FLOPs cost alone.
OpenVINO rows load with ``table_memory="populate"``: steady-state serving, with no page faults (or disk
reads) of a table not yet in memory in the timings; ``bench lookup`` shows what those cost. A row
names the precision that ran: on a CPU without BF16 kernels, ``openvino optimized bf16 (runs f32 here)``.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from engram_export.core import progress
from engram_export.measure.common import (
    cpu_summary,
    format_table,
    matmul_floor,
    precision_label,
    random_calibration,
    random_inputs,
    resident_mib,
    target_line,
)
from engram_export.models.engram import EngramLayer
from engram_export.onnx.export import export_layer, load_onnx, optimize_graph
from engram_export.openvino.compile import compile_onnx
from engram_export.openvino.precision import say_emulated
from engram_export.openvino.quantize import QuantizeOptions, quantize
from engram_export.runtime import EngramRuntime

__all__ = ["BenchRow", "run_bench", "time_rows", "report", "profile_top", "TARGETS"]

# (description, numerator row, denominator row, shape, bound): ratio = numerator ms / denominator ms
TARGETS = [
    ("optimized bf16 / bf16 floor <= 1.2", "openvino optimized bf16", "openvino matmul floor bf16", (50, 14), 1.2),
    ("optimized f32 / f32 floor <= 1.2", "openvino optimized f32", "openvino matmul floor f32", (50, 14), 1.2),
    ("T=1: optimized bf16 / bf16 floor <= 1.5", "openvino optimized bf16", "openvino matmul floor bf16", (50, 1), 1.5),
    ("int8 faster than optimized bf16 >= 1.5x", "openvino optimized bf16", "openvino int8", (50, 14), -1.5),
    ("eager f32 / optimized bf16 >= 6", "pytorch eager (demo layout) f32", "openvino optimized bf16", (50, 14), -6),
    (
        "eager bf16 / optimized bf16 >= 3.5",
        "pytorch eager (demo layout) bf16",
        "openvino optimized bf16",
        (50, 14),
        -3.5,
    ),
    ("T=1: eager f32 / optimized bf16 >= 5", "pytorch eager (demo layout) f32", "openvino optimized bf16", (50, 1), -5),
]


@dataclasses.dataclass
class BenchRow:
    name: str  # unique: what runs and at which precision
    precision: str
    call: Callable
    make_args: Callable  # (ids, hidden) -> the row's own arguments for that input
    load_s: float = 0.0
    memory_mib: tuple = (0, 0, 0, 0)  # growth of private, file-backed resident memory: loaded, after a run
    settings: str = ""
    size_mib: float | None = None  # the model's weights on disk
    group: int = 0  # rows of one group are loaded and timed together
    times_ms: dict = dataclasses.field(default_factory=dict)  # (B, T) -> [ms per round]
    ran_as: str = ""  # the precision that ran, where the device runs ``precision`` as another

    def median(self, shape) -> float:
        return statistics.median(self.times_ms[shape])

    @property
    def label(self) -> str:
        """The name as the tables print it: with the precision that ran, where it is not ``precision``."""
        return f"{self.name} (runs {self.ran_as} here)" if self.ran_as not in ("", self.precision) else self.name


def time_rows(rows: list[BenchRow], shapes: dict, warmup: int, repeat: int) -> None:
    """For each shape (``{shape: (ids, hidden)}``): warm every row up, then ``repeat`` rounds."""
    for shape, (ids, hidden) in shapes.items():
        args = [row.make_args(ids, hidden) for row in rows]
        with progress.steps(f"timing {len(rows)} rows at B, T = {shape}", warmup + repeat, "rounds") as rounds:
            for row, row_args in zip(rows, args, strict=True):
                for _ in range(warmup):
                    row.call(*row_args)
                row.times_ms[shape] = []
            rounds.advance(warmup)
            for _ in range(repeat):
                for row, row_args in zip(rows, args, strict=True):
                    start = time.perf_counter()
                    row.call(*row_args)
                    row.times_ms[shape].append((time.perf_counter() - start) * 1e3)
                rounds.advance()


class _Loader:
    """Builds rows, measuring each model's load (compile) time and resident memory."""

    def __init__(self, probe, group: int = 0):
        self.rows: list = []
        self.probe, self.group = probe, group

    def add(
        self, name, precision, make, make_args=lambda ids, hidden: (ids, hidden), settings="", size_mib=None, ran_as=""
    ):
        gc.collect()
        before, start = resident_mib(), time.perf_counter()
        call = make()
        load_s = time.perf_counter() - start
        loaded = resident_mib()
        call(*make_args(*self.probe))
        ran = resident_mib()
        if not settings and hasattr(call, "settings"):
            settings = ", ".join(f"{k}={v}" for k, v in call.settings.items())
        memory = (loaded[0] - before[0], loaded[1] - before[1], ran[0] - before[0], ran[1] - before[1])
        self.rows.append(
            BenchRow(
                f"{name} {precision}".strip(),
                precision,
                call,
                make_args,
                load_s,
                memory,
                settings,
                size_mib,
                group=self.group,
                ran_as=ran_as,
            )
        )


def _eager(layer):
    """PyTorch eager, the demo layout: the yardstick of every row."""

    def call(ids, hidden):
        with torch.inference_mode():
            return layer.forward_reference(ids, hidden)

    return call


def _torch_args(dtype):
    return lambda ids, hidden: (torch.from_numpy(ids), torch.from_numpy(hidden).to(dtype))


def _bf16_copy(layer):
    """The layer in bf16, without an intermediate f32 copy of its table."""
    with torch.device("meta"):
        clone = EngramLayer(layer.config, layer.layer_id, layer.hashing)
    clone.load_state_dict(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in layer.state_dict().items()}, assign=True
    )
    clone.compress_lut = layer.compress_lut
    return clone.eval()


def _quantized(files, workdir: Path, config, num_ids: int, modes: tuple[str, ...] | list[str]) -> None:
    """Quantize the optimized graph in each mode; int8 calibrates on seeded random sequences."""
    calibration = random_calibration(config, num_ids)
    for mode in modes:
        options = QuantizeOptions(
            mode, calibration=calibration if mode == "int8" else None, group_size=min(128, config.engram_hidden_size)
        )
        files[mode] = quantize(files["optimized"], workdir / f"{mode}.xml", options)


def run_bench(
    layer,
    workdir: Path,
    shapes: list[tuple[int, int]],
    precisions: list[str],
    repeat: int = 20,
    warmup: int = 3,
    profile: bool = False,
    modes: tuple[str, ...] | list[str] = (),
) -> list[BenchRow]:
    """Export raw and optimized graphs of ``layer`` into ``workdir``, quantize in ``modes``, time
    every path, print; with ``profile``, also OpenVINO's per-node times of each model."""
    config = layer.config
    files: dict = {"raw": export_layer(layer, workdir / "raw.onnx", optimize=False)}
    # The optimized graph keeps pointing at raw.onnx.data for the table: one copy on disk and in the
    # page cache for both ONNX Runtime sessions, so neither is timed against evicted pages.
    optimized = load_onnx(files["raw"])
    optimize_graph(optimized)
    files["optimized"] = workdir / "optimized.onnx"
    ir.save(optimized, files["optimized"])
    for graph in ("raw", "optimized"):
        for precision in precisions:
            files[graph, precision] = compile_onnx(files[graph], workdir / f"{graph}_{precision}.xml", precision)
    num_ids = len(layer.hashing.lut)
    _quantized(files, workdir, config, num_ids, modes)
    width_in, width_out = config.engram_hidden_size, (config.hc_mult + 1) * config.hidden_size
    rng = np.random.default_rng(2)
    floor_args = lambda ids, hidden: (rng.standard_normal((ids.size, width_in), np.float32),)  # noqa: E731
    torch_version = f"torch {torch.__version__.split('+')[0]}"
    ran_as = {precision: say_emulated(precision, "CPU", "bench") for precision in precisions}  # what OpenVINO runs

    def group_rows(precision):
        def add_rows(add):
            if precision == "bf16":
                add(
                    "pytorch eager (demo layout)",
                    "bf16",
                    lambda: _eager(_bf16_copy(layer)),
                    _torch_args(torch.bfloat16),
                    torch_version,
                )
            if precision == "f32":
                for graph in ("raw", "optimized"):
                    add(f"onnxruntime {graph}", "f32", lambda g=graph: EngramRuntime(files[g], runtime="ort"))
            for graph in ("raw", "optimized"):
                add(
                    f"openvino {graph}",
                    precision,
                    lambda g=graph: EngramRuntime(files[g, precision], table_memory="populate"),
                    size_mib=_weights_mib(files[graph, precision]),
                    ran_as=ran_as[precision],
                )
            add(
                "openvino matmul floor",
                precision,
                lambda: matmul_floor(width_in, width_out, precision),
                floor_args,
                f"[B*T,{width_in}]x[{width_in},{width_out}]",
                ran_as=ran_as[precision],
            )
            if precision == precisions[-1]:
                for mode in modes:
                    add(
                        f"openvino {mode}",
                        "",
                        lambda m=mode: EngramRuntime(files[m], table_memory="populate"),
                        size_mib=_weights_mib(files[mode]),
                    )

        return add_rows

    # Rows are timed in groups that each fit in memory beside the PyTorch layer (one per precision,
    # the quantized modes with the last); every group has its own eager f32 yardstick.
    inputs = {shape: random_inputs(config, num_ids, *shape, seed=1) for shape in shapes}
    rows = []
    # Everything alive now (imports, traced graphs) outlives the bench: frozen, it is skipped by the
    # collection before each row's memory is read (0.35 s each over a traced process, else)
    gc.collect()
    gc.freeze()
    try:
        for index, add_rows in enumerate(group_rows(p) for p in precisions):
            loader = _Loader(random_inputs(config, num_ids, 2, 3), group=index)
            with progress.stage(f"loading the models of group {index + 1}"):
                loader.add(
                    "pytorch eager (demo layout)",
                    "f32",
                    lambda: _eager(layer),
                    _torch_args(torch.float32),
                    torch_version,
                )
                add_rows(loader.add)
            time_rows(loader.rows, inputs, warmup, repeat)
            for row in loader.rows:
                row.call = None  # release the model before the next group loads
            rows += loader.rows
            gc.collect()
    finally:
        gc.unfreeze()
    print(f"CPU: {cpu_summary()}")
    print(report(rows, shapes))
    if profile:
        for shape, (ids, hidden) in inputs.items():
            for precision in precisions:
                for graph in ("raw", "optimized"):
                    print(f"\nper-node profile, B={shape[0]}, T={shape[1]}, {graph} {precision_label(precision)}:")
                    print(profile_top(files[graph, precision], ids, hidden, precision))
    return rows


def _weights_mib(xml: Path) -> float:
    return xml.with_suffix(".bin").stat().st_size / 2**20


def report(rows: list[BenchRow], shapes) -> str:
    """One table per shape, the loading table, then the targets that these rows can judge.

    "vs eager f32" and "/ floor" compare rows of the same group (timed round-robin together)."""
    eager = {r.group: r for r in rows if r.name == "pytorch eager (demo layout) f32"}
    lines = []
    for shape in shapes:
        floors = {r.precision: r.median(shape) for r in rows if "floor" in r.name}
        table = []
        for row in rows:
            ms, floor = row.median(shape), floors.get(row.precision)
            table.append(
                [
                    row.group + 1,
                    row.label,
                    f"{ms:.2f}",
                    f"{eager[row.group].median(shape) / ms:.2f}x",
                    f"{ms / floor:.2f}" if floor and "floor" not in row.name else "",
                ]
            )
        lines += [
            f"\nB={shape[0]}, T={shape[1]}: median of {len(rows[0].times_ms[shape])} rounds",
            format_table(table, ["group", "row", "ms", "vs eager f32", "/ floor"]),
        ]
    memory = [
        [
            row.label,
            f"{row.size_mib:.0f}" if row.size_mib is not None else "",
            f"{row.load_s:.1f}",
            *(f"{m:+.0f}" for m in row.memory_mib),
            row.settings,
        ]
        for row in rows
        if not (row.name == "pytorch eager (demo layout) f32" and row.group)
    ]
    lines += [
        "\nloading each model (resident memory growth in MiB: private = RssAnon, file = RssFile "
        "such as mmapped weights):",
        format_table(
            memory,
            ["row", ".bin MiB", "load s", "private loaded", "file loaded", "private run", "file run", "settings"],
        ),
    ]
    checks = []
    for text, top, bottom, shape, bound in TARGETS:
        pairs = [
            (a, b)
            for a in rows
            for b in rows
            if a.name == top and b.name == bottom and a.group == b.group and shape in a.times_ms
        ]
        if pairs:
            a, b = pairs[0]
            emulated = sorted({f"{r.precision} runs {r.ran_as} here" for r in (a, b) if r.label != r.name})
            checks.append(target_line(text, a.median(shape) / b.median(shape), bound, "; ".join(emulated)))
    if checks:
        lines += ["\ntargets (ratios from this run; stated for the deepseek-demo dims):", *checks]
    return "\n".join(lines)


def profile_top(xml: Path, ids: np.ndarray, hidden: np.ndarray, precision: str, top: int = 12) -> str:
    """OpenVINO's per-node times (``LayerRuntime.profile``) of the runtime's own path for one model: its
    lookup stage (with the row kernel) and its fuse stage, as ``EngramRuntime`` compiles them."""
    runtime = EngramRuntime(xml, precision=precision, table_memory="populate", ov_config={"PERF_COUNT": True})
    nodes = runtime[runtime.layer_id].profile(ids, hidden)
    rows = [[f"{n['ms']:.2f}", n["stage"], n["node"], n["kernel"], n["name"][:40]] for n in nodes[:top]]
    return f"{xml.name}: {sum(n['ms'] for n in nodes):.2f} ms in nodes\n" + format_table(
        rows, ["ms", "stage", "node", "kernel", "name"]
    )
