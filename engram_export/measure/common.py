"""What verify and every bench share: seeded inputs, tables as text, round-robin timing, resident memory,
the CPU and the precision it really runs, target lines, a local Ray cluster.

No bench imports another; what two of them use lives here (or, for the DeepSeek-V4.1 model the benches
on real text serve, in ``v41_text.py``).
"""

from __future__ import annotations

import gc
import os
import secrets
import statistics
import time
from pathlib import Path

import numpy as np
import openvino
import psutil
import torch
from openvino import opset13 as ops

from engram_export.core import progress
from engram_export.openvino.precision import runs_as

__all__ = [
    "format_table",
    "random_inputs",
    "random_calibration",
    "round_robin_ms",
    "decode_rows",
    "target_line",
    "resident_mib",
    "evict_page_cache",
    "ray_cluster",
    "split_held_out",
    "cpu_summary",
    "precision_label",
    "matmul_floor",
]


def format_table(rows: list[list], headers: list[str]) -> str:
    """``rows`` as left-aligned columns under ``headers`` and a line of dashes."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def random_inputs(config, num_ids: int, batch: int, tokens: int, seed: int = 0, negative: bool = True):
    """Seeded ids over the whole vocabulary and hidden states; with ``negative``, one id is -1 (the demo
    family passes negative ids through; DeepSeek-V4.1 refuses them)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_ids, size=(batch, tokens), dtype=np.int64)
    if negative:
        ids[0, -1] = -1
    hidden = rng.standard_normal((batch, tokens, config.hc_mult, config.hidden_size), dtype=np.float32)
    return ids, hidden


def random_calibration(config, num_ids: int, count: int = 32) -> list[dict]:
    """Seeded random sequences of 14 tokens: int8 calibration for benchmarks (not for accuracy)."""
    return [
        dict(zip(("input_ids", "hidden_states"), random_inputs(config, num_ids, 1, 14, 100 + i), strict=True))
        for i in range(count)
    ]


def decode_rows(runtime, batches, repeat: int) -> list[list]:
    """Decode steps of ``runtime`` (a ``LayerRuntime``) against its stateless [B, 1] call, round-robin per
    batch size: rows of B, step ms, stateless ms, their ratio, tokens/s (what ``bench decode`` and the
    DeepSeek-V4.1 bench print)."""
    config, rows, negative = runtime.config, [], not runtime.info.takes_mask
    for batch in batches:
        ids, hidden = random_inputs(config, runtime.info.num_ids, batch, 1, seed=batch, negative=negative)
        session = runtime.session(batch)
        prompt_ids, prompt_hidden = random_inputs(
            config, runtime.info.num_ids, batch, 8, seed=batch + 1, negative=negative
        )
        session.prefill(prompt_ids, prompt_hidden)

        def step(session=session, ids=ids, hidden=hidden):  # the state grows; the cost stays the same
            return session.step(ids, hidden)

        def stateless(ids=ids, hidden=hidden):
            return runtime(ids, hidden)

        times: dict[str, list[float]] = {"step": [], "stateless": []}
        for call in (step, stateless):
            call()
        for _ in range(repeat):
            for name, call in (("step", step), ("stateless", stateless)):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
        step_ms, stateless_ms = (statistics.median(times[k]) for k in ("step", "stateless"))
        rows.append(
            [
                batch,
                f"{step_ms:.2f}",
                f"{stateless_ms:.2f}",
                f"{step_ms / stateless_ms:.2f}",
                f"{batch / step_ms * 1e3:.0f}",
            ]
        )
    return rows


def round_robin_ms(calls: dict, rounds: int, warmup: int = 1) -> dict:
    """Median ms of each entry, timed round-robin: every round calls each entry once, the first
    ``warmup`` rounds untimed. An entry is a factory ``round index -> zero-argument call``, made outside
    the timing (a round's fresh inputs, a prefetch to fuse)."""
    times: dict = {name: [] for name in calls}
    with progress.steps(f"timing {len(calls)} calls round-robin", warmup + rounds, "rounds") as done:
        for index in range(warmup + rounds):
            for name, make in calls.items():
                call = make(index)
                start = time.perf_counter()
                call()
                if index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
            done.advance()
    return {name: statistics.median(values) for name, values in times.items()}


def target_line(text: str, ratio: float, bound: float, note: str = "") -> str:
    """``  text: ratio met|MISSED [(note)]``: met when ``ratio <= bound``, or for a negative bound (a
    speed-up target) when ``ratio >= -bound``."""
    met = ratio <= bound if bound > 0 else ratio >= -bound
    return f"  {text}: {ratio:.2f} {'met' if met else 'MISSED'}" + (f" ({note})" if note else "")


def resident_mib() -> tuple[float, float]:
    """(private, file-backed) resident memory of this process, from /proc (RssAnon, RssFile)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["RssAnon"], fields["RssFile"]
    except (OSError, KeyError):
        info = psutil.Process().memory_info()
        return info.rss / 2**20 - info.shared / 2**20, info.shared / 2**20


def evict_page_cache(folder: Path) -> None:
    """Drop every file under ``folder`` from the page cache (pages a live mapping holds stay), so that
    the next read of them is a disk read."""
    gc.collect()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def split_held_out(text: str, workdir: Path) -> tuple[Path, Path]:
    """``text`` cut at 80% of its characters (on a paragraph break): (calibration, held-out) files in
    ``workdir``."""
    cut = text.rfind("\n\n", 0, int(len(text) * 0.8))
    cut = int(len(text) * 0.8) if cut < 0 else cut
    files = workdir / "calibration.txt", workdir / "held_out.txt"
    files[0].write_text(text[:cut])
    files[1].write_text(text[cut:])
    return files


def ray_cluster():
    """The ``ray`` module joined to ``RAY_ADDRESS``'s cluster, else to a local one started now (servers on
    127.0.0.1 only, Ray's token authentication on); and whether it was started here (the caller shuts it
    down)."""
    from engram_export.sharding.cluster import connect
    from engram_export.sharding.names import NAMESPACE

    if os.environ.get("RAY_ADDRESS"):
        return connect(), False
    # set before Ray is imported, which reads them then: servers on 127.0.0.1 only, a token
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    ray.init(
        address="local",  # a cluster of its own: without it Ray joins any cluster already running here
        include_dashboard=False,
        object_store_memory=1 << 30,
        namespace=NAMESPACE,
        logging_level="ERROR",
        log_to_driver=False,
    )
    return ray, True


def cpu_summary() -> str:
    """CPU model, the ISA features that matter here (AMX or not), and thread counts."""
    flags: set[str] = set()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    features = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return (
        f"{model}; {'AMX present' if 'amx_bf16' in flags else 'no AMX'}; "
        f"ISA: {', '.join(features) or 'no AVX-512'}; {os.cpu_count()} logical CPUs "
        f"(torch threads {torch.get_num_threads()}, OpenVINO and ONNX Runtime: all cores)"
    )


def precision_label(precision: str, device: str = "CPU") -> str:
    """An OpenVINO inference precision as a bench row or title names it: ``precision`` where ``device``
    has kernels for it, else with what runs instead (``bf16 (runs f32 here)`` on a CPU without BF16), so
    that no table calls an f32 run bf16."""
    ran = runs_as(precision, device) if precision in ("f32", "bf16") else precision
    return precision if ran == precision else f"{precision} (runs {ran} here)"


def matmul_floor(width_in: int, width_out: int, precision: str):
    """The projection GEMM alone in OpenVINO ([N, width_in] x [width_in, width_out], random weights) as a
    function of x: the floor the fuse stage is measured against."""
    x = ops.parameter([-1, width_in], np.float32, name="x")
    weight = np.random.default_rng(0).standard_normal((width_in, width_out), np.float32)
    model = openvino.Model([ops.matmul(x, ops.constant(weight), False, False)], [x])
    request = (
        openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision}).create_infer_request()
    )
    return lambda x: request.infer({"x": x})
