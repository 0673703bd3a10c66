"""ONNX graph passes for the exported Engram graph (installed as ``engram_export.passes``).

Each pass is an ``onnx_ir.passes.InPlacePass`` in its own module; ``optimize`` runs them in order and
removes what they leave unused. ``optimize`` rewrites the demo-layout trace
into standard ONNX that CPUs run fast: one projection GEMM, gates and norms batched over the
hyper-connection branches, a causal conv. ``lower_for_openvino`` then turns everything after the GEMM
into one ``engram.GatedShortConv`` node, which the Engram extension runs as one fused kernel; it is
applied when a model is compiled for OpenVINO, so exported .onnx files keep a single custom node.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes import common

from engram_export.passes.fuse_gated_conv import FuseGatedConvPass
from engram_export.passes.fuse_gating import FuseGatingPass
from engram_export.passes.fuse_projections import FuseProjectionsPass
from engram_export.passes.fuse_short_conv import FuseShortConvPass

__all__ = [
    "FuseProjectionsPass",
    "FuseGatingPass",
    "FuseShortConvPass",
    "FuseGatedConvPass",
    "optimize",
    "lower_for_openvino",
    "PASSES",
]

PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "fuse-projections": FuseProjectionsPass,
    "fuse-gating": FuseGatingPass,
    "fuse-short-conv": FuseShortConvPass,
}


def _cleanup() -> list[ir.passes.PassBase]:
    return [common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()]


def optimize(model: ir.Model) -> ir.passes.PassResult:
    """Run the standard-op passes, then drop dead nodes and initializers (in place)."""
    return ir.passes.PassManager([*(make() for make in PASSES.values()), *_cleanup()])(model)


def lower_for_openvino(model: ir.Model) -> ir.passes.PassResult:
    """Fuse the optimized graph's post-projection block into the extension's kernel (in place)."""
    return ir.passes.PassManager([FuseGatedConvPass(), *_cleanup()])(model)
