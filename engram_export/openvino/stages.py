"""Split a compiled-to-be Engram model into its two stages: lookup and fuse.

- lookup: ``input_ids -> embeddings [B,T,H,d]`` (the bit-exact hash and the Gather on the table). It
  depends only on token ids, so a serving engine can run it early, beside the backbone (prefetch).
- fuse: ``embeddings, hidden_states -> output`` (projection GEMM, gates, short conv).

The split also keeps an INT8 table compressed in memory when the projection is statically quantized:
compiled together, the CPU plugin's low-precision pipeline folds the table's decompression back to f32.
"""

from __future__ import annotations

import openvino
from openvino import opset13 as ops
from openvino.preprocess import PrePostProcessor

from engram_export.core.errors import EngramError, one_line

__all__ = ["split_stages", "infer", "wait", "EMBEDDINGS"]

EMBEDDINGS = "embeddings"


def infer(request, inputs: dict) -> None:
    """Run ``request`` on ``inputs`` and wait for it: always through ``start_async`` and ``wait``. With
    ``INFERENCE_NUM_THREADS`` 1 (``EngramRuntime(threads=1)``), the CPU plugin of OpenVINO 2026.4 drops the
    error of a failing synchronous ``infer`` and hands back an empty output; ``wait`` raises it."""
    request.start_async(inputs)
    wait(request)


def wait(request) -> None:
    """Wait for ``request``; a failure inside it (a tiered table's read of a file truncated since load)
    becomes a one-line ``EngramError``."""
    try:
        request.wait()
    except RuntimeError as exc:
        raise EngramError(f"the Engram call failed: {one_line(exc)}") from exc


def _embeddings_output(model):
    """Where the lookup ends. Demo family: the [B,T,H,d] output of EngramHash -> Gather (before any
    Reshape or FakeQuantize, which belong to the projection). DeepSeek-V4.1 (a blocking hash): the
    dequantized rows [B,T,C*d], the activation input of the one projection MatMul."""
    hashes = [op for op in model.get_ops() if op.get_type_name() == "EngramHash"]
    if len(hashes) != 1:
        raise EngramError(f"expected one EngramHash op in the model, found {len(hashes)}")
    if hashes[0].get_attributes().get("blocking"):
        matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
        if len(matmuls) != 1:
            raise EngramError(f"expected one projection MatMul after the lookup, found {len(matmuls)}")
        rows = matmuls[0].input_value(0)
        while _projection_input_op(rows.get_node()):  # static INT8: they go with the GEMM into the fuse stage
            rows = rows.get_node().input_value(0)
        return rows
    consumers = [t.get_node() for t in hashes[0].output(0).get_target_inputs()]
    if len(consumers) != 1 or consumers[0].get_type_name() != "Gather":
        raise EngramError("unexpected graph after the hash: no single Gather on the table")
    return consumers[0].output(0)


def _projection_input_op(node) -> bool:
    """An op NNCF put on the projection's input: its activation quantizer (FakeQuantize) or SmoothQuant's
    per-channel scale (a Multiply by a constant). Compiled apart from the GEMM, the CPU plugin would run
    the GEMM on f32 activations with its weights decompressed: no INT8 kernel."""
    if node.get_type_name() == "FakeQuantize":
        return True
    return node.get_type_name() == "Multiply" and node.input_value(1).get_node().get_type_name() == "Constant"


def _ancestors(output) -> set:
    """The unique names of every node ``output`` depends on (Python wrappers of one node differ)."""
    seen, stack = set(), [output.get_node()]
    while stack:
        node = stack.pop()
        if node.get_name() not in seen:
            seen.add(node.get_name())
            stack += [value.get_node() for value in node.input_values()]
    return seen


def split_stages(model, precision: str = "f32"):
    """(lookup, fuse) ``openvino.Model``s built from ``model``'s nodes (``model`` is consumed).

    The lookup reads ``input_ids`` (and ``token_mask``); the fuse stage reads the embeddings,
    ``hidden_states`` (and its own ``token_mask``). With ``precision`` bf16 the embeddings pass between
    the stages in bf16, as the bf16 lookup makes them and the bf16 GEMM reads them: no conversion to
    f32 and back, half the bytes.
    """
    embeddings = _embeddings_output(model)
    lookup_side = _ancestors(embeddings)
    consumers = list(embeddings.get_target_inputs())
    inputs = {p.get_friendly_name(): p for p in model.get_parameters()}
    lookup_inputs = [inputs[name] for name in ("input_ids", "token_mask") if name in inputs]
    lookup = openvino.Model([embeddings], lookup_inputs, "engram_lookup")
    parameter = ops.parameter(embeddings.get_partial_shape(), embeddings.get_element_type(), EMBEDDINGS)
    parameter.output(0).set_names({EMBEDDINGS})
    for consumer in consumers:
        consumer.replace_source_output(parameter.output(0))
    fuse_inputs = [parameter, inputs["hidden_states"]]
    if "token_mask" in inputs:  # the gate reads the mask too: a parameter of the fuse stage's own
        mask = inputs["token_mask"]
        fuse_mask = ops.parameter(mask.get_partial_shape(), mask.get_element_type(), "token_mask")
        fuse_mask.output(0).set_names({"token_mask"})
        for target in list(mask.output(0).get_target_inputs()):
            if target.get_node().get_name() not in lookup_side:
                target.replace_source_output(fuse_mask.output(0))
        fuse_inputs.append(fuse_mask)
    # The raw trace also reads the shape of input_ids (B, T) after the lookup: take it from the
    # embeddings instead, which have the same first two dimensions.
    for target in list(inputs["input_ids"].output(0).get_target_inputs()):
        node = target.get_node()
        if node.get_name() in lookup_side:
            continue
        if node.get_type_name() != "ShapeOf":
            raise EngramError(f"the fuse stage reads input_ids through {node.get_type_name()}")
        batch_and_tokens = ops.slice(ops.shape_of(parameter, node.get_output_element_type(0)), [0], [2], [1])
        for user in list(node.output(0).get_target_inputs()):
            user.replace_source_output(batch_and_tokens.output(0))
    fuse = openvino.Model(model.get_results(), fuse_inputs, "engram_fuse")
    if precision == "bf16":
        steps = PrePostProcessor(lookup)
        steps.output().tensor().set_element_type(openvino.Type.bf16)
        lookup = steps.build()
        steps = PrePostProcessor(fuse)
        steps.input(EMBEDDINGS).tensor().set_element_type(openvino.Type.bf16)
        fuse = steps.build()
        _bf16_projection_output(fuse)
    return lookup, fuse


def _plain_float_weights(matmul) -> bool:
    """A MatMul of float activations and float weights (a constant, or one stored narrower and
    converted): not one NNCF compressed or quantized, whose patterns the CPU plugin matches as they are."""
    activations, weights = (value.get_node() for value in matmul.input_values())
    if weights.get_type_name() == "Convert":
        weights = weights.input_value(0).get_node()
    return (
        activations.get_type_name() != "FakeQuantize"
        and weights.get_type_name() == "Constant"
        and weights.get_output_element_type(0).is_real()
    )


def _bf16_projection_output(fuse) -> None:
    """Type the projection (MatMul + bias of float weights) feeding ``EngramGatedShortConv`` as bf16, in
    place.

    Typed f32 in the model, the CPU plugin runs the bf16 GEMM and then converts its output to f32 for the
    custom op in a pass of its own. Typed bf16, the GEMM writes bf16 and the kernel widens each row as it
    reads it: no pass, half the bytes (docs/performance.md). The projection's output is then rounded to
    bf16, as a bf16 GEMM's output is in PyTorch: against the f32 path, the layer output's mean |error|
    went from 0.00087 to 0.00099 (deepseek-demo dims, cosine of the Engram delta 0.9999992); the bf16
    tolerances of the tests hold."""
    bf16 = openvino.Type.bf16
    for conv in [op for op in fuse.get_ops() if op.get_type_name() == "EngramGatedShortConv"]:
        add = conv.input_value(0).get_node()
        if add.get_type_name() != "Add":
            continue
        matmul, bias = (add.input_value(0), add.input_value(1))
        if matmul.get_node().get_type_name() != "MatMul":
            matmul, bias = bias, matmul
        if matmul.get_node().get_type_name() != "MatMul" or not _plain_float_weights(matmul.get_node()):
            continue
        attrs = matmul.get_node().get_attributes()
        activations, weights = (ops.convert(value, bf16) for value in matmul.get_node().input_values())
        product = ops.matmul(activations, weights, attrs["transpose_a"], attrs["transpose_b"])
        conv.input(0).replace_source_output(ops.add(product, ops.convert(bias, bf16)).output(0))
    fuse.validate_nodes_and_infer_types()
