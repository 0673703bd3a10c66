"""Split a compiled-to-be Engram model into its two stages: lookup and fuse.

- lookup: ``input_ids -> embeddings [B,T,H,d]`` (the bit-exact hash and the Gather on the table). It
  depends only on token ids, so a serving engine can run it early, beside the backbone (prefetch).
- fuse: ``embeddings, hidden_states -> output`` (projection GEMM, gates, short conv).

The split also keeps an INT8 table compressed in memory when the projection is statically quantized:
compiled together, the CPU plugin's low-precision pipeline folds the table's decompression back to f32.
"""

from __future__ import annotations

from engram_export.errors import EngramError

__all__ = ["split_stages", "EMBEDDINGS"]

EMBEDDINGS = "embeddings"


def _embeddings_output(model):
    """The [B,T,H,d] output of the table lookup: EngramHash -> Gather (the split point is before any
    Reshape or FakeQuantize, which belong to the projection)."""
    hashes = [op for op in model.get_ops() if op.get_type_name() == "EngramHash"]
    if len(hashes) != 1:
        raise EngramError(f"expected one EngramHash op in the model, found {len(hashes)}")
    consumers = [t.get_node() for t in hashes[0].output(0).get_target_inputs()]
    if len(consumers) != 1 or consumers[0].get_type_name() != "Gather":
        raise EngramError("unexpected graph after the hash: no single Gather on the table")
    return consumers[0].output(0)


def split_stages(model, precision: str = "f32"):
    """(lookup, fuse) ``openvino.Model``s built from ``model``'s nodes (``model`` is consumed).

    With ``precision`` bf16 the embeddings pass between the stages in bf16, as the bf16 lookup makes
    them and the bf16 GEMM reads them: no conversion to f32 and back, half the bytes.
    """
    import openvino
    from openvino import opset13 as ops

    embeddings = _embeddings_output(model)
    consumers = list(embeddings.get_target_inputs())
    inputs = {p.get_friendly_name(): p for p in model.get_parameters()}
    lookup = openvino.Model([embeddings], [inputs["input_ids"]], "engram_lookup")
    parameter = ops.parameter(embeddings.get_partial_shape(), embeddings.get_element_type(), EMBEDDINGS)
    parameter.output(0).set_names({EMBEDDINGS})
    for consumer in consumers:
        consumer.replace_source_output(parameter.output(0))
    # The raw trace also reads the shape of input_ids (B, T) after the lookup: take it from the
    # embeddings instead, which have the same first two dimensions.
    for target in list(inputs["input_ids"].output(0).get_target_inputs()):
        node = target.get_node()
        if node.get_type_name() == "EngramHash":
            continue
        if node.get_type_name() != "ShapeOf":
            raise EngramError(f"the fuse stage reads input_ids through {node.get_type_name()}")
        batch_and_tokens = ops.slice(ops.shape_of(parameter, node.get_output_element_type(0)),
                                     [0], [2], [1])
        for user in list(node.output(0).get_target_inputs()):
            user.replace_source_output(batch_and_tokens.output(0))
    fuse = openvino.Model(model.get_results(), [parameter, inputs["hidden_states"]], "engram_fuse")
    if precision == "bf16":
        from openvino.preprocess import PrePostProcessor

        steps = PrePostProcessor(lookup)
        steps.output().tensor().set_element_type(openvino.Type.bf16)
        lookup = steps.build()
        steps = PrePostProcessor(fuse)
        steps.input(EMBEDDINGS).tensor().set_element_type(openvino.Type.bf16)
        fuse = steps.build()
    return lookup, fuse
