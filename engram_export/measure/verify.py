"""Check every runtime path against the PyTorch layer on the same inputs.

Metrics per path and shape, against PyTorch f32 (the vectorized forward):
- ``max_abs``: max |out - ref|;
- ``max_rel``: max |out - ref| / max |ref| (normalized by the output's scale, so values near zero do
  not make it meaningless);
- cosine similarity per output row (one token's [G*D] vector): min and mean.

Tolerances: f32 paths ``max_rel <= 1e-4`` (float32 rounding through ~10^3-term dot products and
differently ordered reductions stays around 1e-6; 1e-4 leaves room for kernel differences and still
catches any wrong row, branch or weight). bf16 paths: mean row cosine >= 0.999 (bf16 keeps 8 bits of
mantissa, ~3e-3 relative per element; a real error drops cosine far below that). NNCF-quantized
models: the floor of their mode (``QUANTIZED_MIN_MEAN_COSINE``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from engram_export.core import progress
from engram_export.measure.common import format_table, random_inputs
from engram_export.models.config import is_deepseek_v41
from engram_export.models.engram import EngramLayer
from engram_export.onnx.export import export_layer
from engram_export.openvino.compile import compile_onnx
from engram_export.runtime import EngramRuntime

__all__ = [
    "Comparison",
    "compare",
    "checked_as",
    "random_inputs",
    "verify_paths",
    "verify_paths_v41",
    "comparisons_table",
    "default_paths",
    "verify_layer",
    "failures_summary",
    "F32_MAX_REL",
    "BF16_MIN_MEAN_COSINE",
    "QUANTIZED_MIN_MEAN_COSINE",
]

F32_MAX_REL = 1e-4
BF16_MIN_MEAN_COSINE = 0.999
QUANTIZED_MIN_MEAN_COSINE = {"int8-weights": 0.9999, "int8": 0.999, "int4-weights": 0.99}


@dataclasses.dataclass
class Comparison:
    path: str
    shape: str
    max_abs: float
    max_rel: float
    min_cosine: float
    mean_cosine: float
    criterion: str
    passed: bool


def row_cosines(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    ref = reference.reshape(-1, reference.shape[-2] * reference.shape[-1]).astype(np.float64)
    out = output.reshape(ref.shape).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    return np.sum(ref * out, axis=1) / np.maximum(norms, 1e-30)


def compare(
    path: str, reference: np.ndarray, output: np.ndarray, precision: str = "f32", quantization: str | None = None
) -> Comparison:
    """Metrics of ``output`` against ``reference``; the criterion depends on ``precision`` and, for
    quantized models, on the quantization mode."""
    if output.shape != reference.shape:
        raise AssertionError(f"{path}: output shape {output.shape} != reference {reference.shape}")
    error = np.abs(output.astype(np.float64) - reference)
    max_abs = float(error.max())
    max_rel = max_abs / max(float(np.abs(reference).max()), 1e-30)
    cosines = row_cosines(reference, output)
    finite = bool(np.isfinite(output).all())
    if quantization is not None:
        floor = QUANTIZED_MIN_MEAN_COSINE[quantization]
        criterion, passed = f"{quantization}: mean_cos >= {floor}", float(cosines.mean()) >= floor
    elif precision == "f32":
        criterion, passed = f"max_rel <= {F32_MAX_REL:g}", max_rel <= F32_MAX_REL
    else:
        criterion = f"mean_cos >= {BF16_MIN_MEAN_COSINE}"
        passed = float(cosines.mean()) >= BF16_MIN_MEAN_COSINE
    shape = "x".join(str(s) for s in reference.shape[:2])
    return Comparison(
        path, shape, max_abs, max_rel, float(cosines.min()), float(cosines.mean()), criterion, passed and finite
    )


def checked_as(runtime) -> str:
    """The precision whose criterion a runtime's output is held to: f32 only where the file's own
    precision and the one it runs in are both f32 (a bf16 IR keeps its weights in f16, also when a CPU
    without bf16 kernels runs it in f32)."""
    return "f32" if runtime.precision == runtime.info.precision == "f32" else "bf16"


def verify_paths(layer: EngramLayer, runtimes: dict, shapes: list[tuple[int, int]], seed: int = 0) -> list[Comparison]:
    """Compare each ``{name: EngramRuntime}`` and the demo-layout forward to PyTorch, per shape."""
    results = []
    for batch, tokens in shapes:
        ids, hidden = random_inputs(layer.config, len(layer.hashing.lut), batch, tokens, seed)
        with torch.inference_mode():
            args = (torch.from_numpy(ids), torch.from_numpy(hidden))
            reference = layer.forward_vectorized(*args).double().numpy()
            reference_layout = layer.forward_reference(*args).numpy()
        results.append(compare("pytorch (demo layout)", reference, reference_layout))
        for name, runtime in runtimes.items():
            results.append(compare(name, reference, runtime(ids, hidden), checked_as(runtime), runtime.quantization))
    return results


def verify_paths_v41(layer, runtimes: dict, shapes: list[tuple[int, int]], seed: int = 0) -> list[Comparison]:
    """DeepSeek-V4.1: each ``{name: EngramRuntime}`` against the layer computed in float64, on
    Δ = out - h (the output includes the residual, which would hide errors in ``value``); a fifth of
    the tokens are image tokens, whose output must be h exactly."""
    results = []
    config = layer.config
    for batch, tokens in shapes:
        rng = np.random.default_rng(seed + batch * 1000 + tokens)
        ids = rng.integers(0, len(layer.hashing.lut), (batch, tokens))
        hidden = rng.standard_normal((batch, tokens, config.hc_mult, config.hidden_size), dtype=np.float32)
        mask = rng.random((batch, tokens)) > 0.2
        with torch.inference_mode():
            reference = (
                layer(torch.from_numpy(ids), torch.from_numpy(hidden).double(), torch.from_numpy(mask)).numpy() - hidden
            )
        for name, runtime in runtimes.items():
            output = runtime(ids, hidden, token_mask=mask)
            # metrics over the text tokens (Δ is 0 on image tokens), which must equal h exactly
            result = compare(
                name, reference[mask][None], (output - hidden)[mask][None], checked_as(runtime), runtime.quantization
            )
            exact = np.array_equal(output[~mask], hidden[~mask])
            results.append(
                dataclasses.replace(
                    result,
                    shape=f"{batch}x{tokens}",
                    passed=result.passed and exact,
                    criterion=result.criterion + "; image tokens == h",
                )
            )
    return results


def comparisons_table(results: list[Comparison]) -> str:
    rows = [
        [
            r.path,
            r.shape,
            f"{r.max_abs:.2e}",
            f"{r.max_rel:.2e}",
            f"{r.min_cosine:.6f}",
            f"{r.mean_cosine:.6f}",
            r.criterion,
            "ok" if r.passed else "FAIL",
        ]
        for r in results
    ]
    return format_table(rows, ["path", "BxT", "max_abs", "max_rel", "min_cos", "mean_cos", "criterion", "result"])


def default_paths(onnx_path: Path, xml_paths: dict[str, Path]) -> dict:
    """Runtimes for verify: ONNX Runtime on the .onnx, OpenVINO on each .xml (compiled or quantized)."""
    runtimes = {"onnxruntime f32": EngramRuntime(onnx_path, runtime="ort")}
    for name, xml in xml_paths.items():
        runtimes[f"openvino {name}"] = EngramRuntime(xml)
    return runtimes


def failures_summary(results: list[Comparison]) -> list[str]:
    """One loud line per failed path (quantized modes name the floor they missed)."""
    return [
        f"FAILED: {r.path} at {r.shape}: {r.criterion} not met (mean_cos {r.mean_cosine:.6f}, max_rel {r.max_rel:.2e})"
        for r in results
        if not r.passed
    ]


def verify_layer(layer, workdir: Path, onnx_path: Path | None, shapes, extra=(), export=None) -> list[Comparison]:
    """Export ``layer`` into ``workdir`` (unless ``onnx_path`` is given; with ``export(path)`` if given),
    compile it f32 and bf16, and compare every path (and the ``extra`` .xml files, such as quantized
    models) with the layer at each of ``shapes``: one ``Comparison`` per path and shape."""
    if onnx_path is None:
        onnx_path = (export or (lambda path: export_layer(layer, path)))(workdir / "engram.onnx")
    xml = {p: compile_onnx(onnx_path, workdir / f"engram_{p}.xml", p) for p in ("f32", "bf16")}
    names = [path.name for path in extra]  # two quantized folders both hold layer_3.xml: label by path
    xml.update({path.name if names.count(path.name) == 1 else str(path): path for path in extra})
    with progress.stage(f"running every path at {', '.join(f'{b}x{t}' for b, t in shapes)}"):
        verify = verify_paths_v41 if is_deepseek_v41(layer.config) else verify_paths
        return verify(layer, default_paths(onnx_path, xml), shapes)
