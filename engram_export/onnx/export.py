"""Trace an Engram layer into ONNX: standard ops plus one ``engram.HashGather`` node.

``torch.onnx.export`` (dynamo) traces the demo-layout forward; the hash-gather custom op becomes one
custom-domain node through the exporter's translation table, and the model carries that node's
definition as a model-local function, so ONNX Runtime and ``onnx.checker`` need nothing extra.
Tables that make the file larger than protobuf's 2 GB go to external data beside it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx_ir as ir
import torch

from engram_export.contract.model_info import ModelInfo
from engram_export.core import progress
from engram_export.core.errors import EngramError
from engram_export.core.fileio import check_output_file
from engram_export.core.resources import require_disk, tensor_bytes
from engram_export.models.engram import EngramLayer
from engram_export.onnx import op as onnx_op
from engram_export.onnx.files import EXTERNAL_DATA_THRESHOLD, load_onnx, read_onnx_file, save_onnx
from engram_export.passes import optimize

__all__ = [
    "export_layer",
    "load_onnx",
    "read_onnx_file",
    "save_onnx",
    "optimize_graph",
    "EXTERNAL_DATA_THRESHOLD",
    "OPSET",
    "IR_VERSION",
]

log = logging.getLogger(__name__)
OPSET = 23  # RMSNormalization: one op per RMSNorm, fused kernels in OpenVINO and ONNX Runtime
IR_VERSION = 11  # what opset 23 needs; ONNX Runtime 1.31 reads <= 13


def trace(layer: EngramLayer) -> ir.Model:
    """The demo-layout forward as an onnx_ir model with dynamic B and T."""
    config = layer.config
    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    hidden = torch.zeros(2, 5, config.hc_mult, config.hidden_size)
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    layer.reference_layout = True
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" noise, for this export only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                layer,
                (input_ids, hidden),
                dynamo=True,
                verbose=False,
                input_names=["input_ids", "hidden_states"],
                output_names=["output"],
                opset_version=OPSET,
                dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "hidden_states": {0: batch, 1: tokens}},
                custom_translation_table=onnx_op.translation_table(),
            )
    finally:
        layer.reference_layout = False
        onnx_log.setLevel(level)
    if program is None:
        raise EngramError("torch.onnx.export returned no program")
    model = program.model
    function = ir.serde.deserialize_function(
        onnx_op.hash_gather_function(config.max_ngram_size, model.opset_imports[""])
    )
    model.functions[function.identifier()] = function
    model.opset_imports[onnx_op.DOMAIN] = onnx_op.OPSET_VERSION
    model.ir_version = IR_VERSION
    return model


def optimize_graph(model: ir.Model) -> ir.Model:
    """Run the graph passes (``passes/``) in place, reporting node counts."""
    with progress.stage("optimizing the graph") as notes:
        before = model.graph.num_nodes()
        optimize(model)
        notes["nodes"] = f"{before} -> {model.graph.num_nodes()}"
    return model


def export_layer(
    layer: EngramLayer,
    output: str | Path,
    optimize: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export ``layer`` to ``output`` (.onnx), with the graph passes unless ``optimize`` is False;
    returns the path written."""
    check_output_file(output, ".onnx")  # before the trace, which takes a while
    require_disk(
        Path(output).parent,
        tensor_bytes(layer.state_dict().values()),
        f"export: the ONNX file of layer {layer.layer_id}",
    )
    with progress.stage(f"tracing Engram layer {layer.layer_id} with torch.onnx.export"):
        model = trace(layer)
    if optimize:
        optimize_graph(model)
    model.metadata_props.update(ModelInfo(layer.config, layer.layer_id, len(layer.hashing.lut)).to_metadata())
    return save_onnx(model, output, external_data_threshold)
