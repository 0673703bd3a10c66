"""ONNX graph passes for the exported Engram graph (installed as ``engram_export.passes``).

Each pass is an ``onnx_ir.passes.InPlacePass`` in its own module; ``optimize`` runs them in order and
removes what they leave unused. They rewrite the demo-layout trace into the form CPUs run fastest:
one projection GEMM, gates and norms batched over the hyper-connection branches, a causal conv.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from engram_export.passes.fuse_gating import FuseGatingPass
from engram_export.passes.fuse_projections import FuseProjectionsPass
from engram_export.passes.fuse_short_conv import FuseShortConvPass

__all__ = ["FuseProjectionsPass", "FuseGatingPass", "FuseShortConvPass", "optimize", "PASSES"]

PASSES = {"fuse-projections": FuseProjectionsPass, "fuse-gating": FuseGatingPass,
          "fuse-short-conv": FuseShortConvPass}


def optimize(model: ir.Model) -> ir.passes.PassResult:
    """Run every pass, then drop dead nodes and initializers; the model is changed in place."""
    manager = ir.passes.PassManager([
        *(make() for make in PASSES.values()),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
    ])
    return manager(model)
