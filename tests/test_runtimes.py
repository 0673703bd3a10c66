"""The exported file and every runtime path against PyTorch, at B=50 T=14 and small and odd shapes.

Tolerances are the ones ``engram-export verify`` applies (see ``engram_export/verify.py``): f32 paths
max |err| / max |ref| <= 1e-4, bf16 mean row cosine >= 0.999.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.measure.verify import checked_as, compare, random_inputs
from engram_export.onnx import op as onnx_op
from engram_export.onnx.export import export_layer
from engram_export.openvino.precision import capabilities, runs_as
from engram_export.runtime import EngramRuntime

# T=1; T=17 > the short conv's reach of (kernel-1)*dilation = 9 tokens; B=50, T=14 is Intel's shape.
SHAPES = [(1, 1), (3, 17), (50, 14), (2, 40)]


@pytest.mark.parametrize("graph", ["optimized", "raw"])
def test_onnx_graph_is_standard_but_one_hash_gather_node(tiny_files, tiny_raw_files, graph):
    model = onnx.load((tiny_files if graph == "optimized" else tiny_raw_files)["onnx"])
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert [(n.domain, n.op_type) for n in custom] == [("engram", "HashGather")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert set(attrs) == {"multipliers", "primes", "pad_id", "n_head_per_ngram"}
    assert [f.name for f in model.functions] == ["HashGather"]
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["input_ids"].elem_type == onnx.TensorProto.INT64
    assert inputs["hidden_states"].elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inputs["hidden_states"].shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2:] == [4, 48]
    assert [o.name for o in model.graph.output] == ["output"]


@pytest.fixture(scope="module")
def runtimes(tiny_files, tiny_raw_files):
    """Every path, on the optimized graph and on the raw trace."""
    paths = {}
    for graph, files in (("optimized", tiny_files), ("raw", tiny_raw_files)):
        paths.update(
            {
                f"{graph} onnxruntime": EngramRuntime(files["onnx"], runtime="ort"),
                f"{graph} openvino-onnx f32": EngramRuntime(files["onnx"], precision="f32"),
                f"{graph} openvino f32": EngramRuntime(files["f32"]),
                f"{graph} openvino bf16": EngramRuntime(files["bf16"]),
            }
        )
    return paths


@pytest.mark.parametrize("batch,tokens", SHAPES)
def test_every_path_matches_pytorch(tiny_layer, runtimes, batch, tokens):
    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), batch, tokens, seed=3)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    for name, runtime in runtimes.items():
        result = compare(name, reference, runtime(ids, hidden), checked_as(runtime))
        assert result.passed, result
    assert runtimes["optimized openvino bf16"].precision == runs_as("bf16")  # f32 on a CPU without bf16 kernels


def test_reference_evaluator_runs_the_numpy_kernel(tiny_layer, tiny_files):
    from onnx.reference import ReferenceEvaluator

    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), 2, 9, seed=4)
    evaluator = ReferenceEvaluator(str(tiny_files["onnx"]), new_ops=[onnx_op.HashGather])
    out = evaluator.run(None, {"input_ids": ids, "hidden_states": hidden})[0]
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_compiled_model_keeps_the_table_a_standard_gather(tiny_files):
    from engram_export.openvino.extension import openvino_core

    model = openvino_core().read_model(str(tiny_files["f32"]))
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    hashes = [op for op in ops.values() if op.get_type_name() == "EngramHash"]
    assert len(hashes) == 1
    consumers = [t.get_node() for t in hashes[0].output(0).get_target_inputs()]
    assert [c.get_type_name() for c in consumers] == ["Gather"]
    table = consumers[0].input_value(0).get_node()
    assert table.get_type_name() in ("Constant", "Convert")  # Convert: fp16-stored (bf16) weights
    assert "BitwiseXor" not in {op.get_type_name() for op in ops.values()}


def test_optimized_graph_compiles_to_the_fused_kernel(tiny_files, tiny_raw_files):
    from engram_export.openvino.extension import openvino_core

    def types(xml):
        return [op.get_type_name() for op in openvino_core().read_model(str(xml)).get_ops()]

    assert types(tiny_files["f32"]).count("EngramGatedShortConv") == 1
    assert not {"Convolution", "GroupConvolution"} & set(types(tiny_files["bf16"]))
    assert "EngramGatedShortConv" not in types(tiny_raw_files["f32"])
    assert not list(tiny_files["onnx"].parent.glob(".*"))  # the lowered temporary copy is gone


@pytest.mark.skipif(
    "BF16" not in (capabilities() or ()),
    reason="this CPU has no bf16 kernels: the runtime compiles f32 there (test_precision.py checks that side)",
)
def test_bf16_fuse_stage_hands_the_gemm_output_to_the_kernel_in_bf16(tiny_files):
    """The bf16 GEMM's output is read by EngramGatedShortConv as it is: no conversion node between them
    (numbers: test_every_path_matches_pytorch)."""
    runtime = EngramRuntime(tiny_files["bf16"])
    nodes = runtime[runtime.layer_id]._backend.fuses.compiled.get_runtime_model().get_ordered_ops()
    kinds = [(n.get_rt_info()["layerType"].astype(str), n.get_rt_info()["runtimePrecision"].astype(str)) for n in nodes]
    assert ("FullyConnected", "bf16") in kinds and ("Reference", "bf16") in kinds, kinds
    assert not {"Reorder", "Convert"} & {kind for kind, _ in kinds}, kinds


@pytest.mark.parametrize("batch,tokens", [(1, 1), (3, 17)])
def test_gated_short_conv_reads_bf16_projections_exactly(batch, tokens):
    """The kernel on bf16 projections equals the kernel on the same values given as f32, bit for bit."""
    import openvino
    from openvino import opset13 as ops

    from engram_export.openvino.extension import make_node, openvino_core

    groups, dim, kernel = 2, 16, 3
    rng = np.random.default_rng(7)
    values = rng.standard_normal((batch, tokens, (groups + 1) * dim)).astype(np.float32)
    values = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bf16
    hidden = rng.standard_normal((batch, tokens, groups, dim)).astype(np.float32)
    constants = [
        ops.constant(rng.uniform(0.5, 1.5, (groups, dim)).astype(np.float32)).output(0),
        ops.constant(rng.standard_normal((groups * dim, 1, kernel, 1)).astype(np.float32)).output(0),
    ]
    attributes = {
        "eps_key": 1e-5,
        "eps_query": 1e-5,
        "eps_conv": 1e-5,
        "score_scale": 4.0,
        "floor": 1e-6,
        "dilation": 2,
    }
    outputs = []
    for kind in (openvino.Type.f32, openvino.Type.bf16):
        proj = ops.parameter([-1, -1, (groups + 1) * dim], kind, name="proj")
        query = ops.parameter([-1, -1, groups, dim], np.float32, name="hidden")
        node = make_node("EngramGatedShortConv", [proj.output(0), query.output(0), *constants], attributes)
        compiled = openvino_core().compile_model(
            openvino.Model([node.output(0)], [proj, query]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        feed = values
        if kind == openvino.Type.bf16:
            feed = openvino.Tensor(kind, openvino.Shape(list(values.shape)))
            feed.data.view(np.uint16)[...] = values.view(np.uint32) >> 16
        outputs.append(compiled({"proj": feed, "hidden": hidden})[0])
    assert np.isfinite(outputs[0]).all() and np.abs(outputs[0]).max() > 0
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_external_data_for_large_tables(tiny_layer, tmp_path):
    path = export_layer(tiny_layer, tmp_path / "big.onnx", external_data_threshold=1000)
    table_bytes = tiny_layer.multi_head_embedding.embedding.weight.nbytes
    assert (tmp_path / "big.onnx.data").stat().st_size > table_bytes
    tensors = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    table = tensors["multi_head_embedding.embedding.weight"]
    assert table.data_location == onnx.TensorProto.EXTERNAL
    onnx.checker.check_model(str(path), full_check=True)
    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), 2, 5)
    with torch.inference_mode():
        reference = tiny_layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    assert compare("ort", reference, EngramRuntime(path, runtime="ort")(ids, hidden)).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_tokenizer_config_end_to_end(tiny_config, tokenizer_json, tmp_path):
    """Compression inside the graph: raw BERT ids in, same numbers as PyTorch out."""
    from engram_export.models.weights import build_layer
    from engram_export.openvino.compile import compile_onnx

    config = tiny_config.replace(tokenizer=str(tokenizer_json), pad_id=0, vocab_size=30522)
    layer = build_layer(config, 1, seed=2)
    onnx_path = export_layer(layer, tmp_path / "tok.onnx")
    xml = compile_onnx(onnx_path, tmp_path / "tok.xml")
    from tokenizers import Tokenizer

    encoded = Tokenizer.from_file(str(tokenizer_json)).encode(
        "Only Alexander the Great could tame the horse Bucephalus. ２ ²"
    )
    ids = np.array([encoded.ids], dtype=np.int64)
    hidden = np.random.default_rng(0).standard_normal((1, ids.shape[1], 4, 48), dtype=np.float32)
    with torch.inference_mode():
        reference = layer(torch.from_numpy(ids), torch.from_numpy(hidden)).double().numpy()
    for runtime in (EngramRuntime(onnx_path, runtime="ort"), EngramRuntime(xml)):
        assert compare(runtime.runtime, reference, runtime(ids, hidden)).passed
        with pytest.raises(EngramError, match=r"id 30522 is out of range \[0, 30522\)"):
            runtime(np.full((1, 2), 30522), hidden[:, :2])


BAD_INPUTS = [
    (lambda ids, h: (ids.astype(np.float32), h), "input_ids must be integer"),
    (lambda ids, h: (ids[0], h), r"input_ids must be \[batch, tokens\]"),
    (lambda ids, h: (ids[:, :0], h[:, :0]), "input_ids is empty"),
    (lambda ids, h: (ids[:0], h[:0]), "input_ids is empty"),
    (lambda ids, h: (ids, h.astype(np.float64)), "hidden_states must be float32"),
    (lambda ids, h: (ids, h[:, :, :3]), r"hidden_states must be .* = \[2, 5, 4, 48\], got \[2, 5, 3, 48\]"),
    (lambda ids, h: (ids, h[..., :47]), r"got \[2, 5, 4, 47\]"),
    (lambda ids, h: (ids[:, :4], h), r"= \[2, 4, 4, 48\], got \[2, 5, 4, 48\]"),
    (lambda ids, h: (ids + 5000, h), r"out of range \[0, 5000\)"),
    (lambda ids, h: (ids - 2**40, h), "below int32"),
]


@pytest.mark.parametrize("mutate,message", BAD_INPUTS)
def test_bad_inputs_are_refused_by_every_runtime(runtimes, tiny_config, mutate, message):
    ids, hidden = random_inputs(tiny_config, tiny_config.vocab_size, 2, 5)
    for runtime in runtimes.values():
        with pytest.raises(EngramError, match=message):
            runtime(*mutate(ids, hidden))


def test_bad_model_paths(tmp_path, tiny_files):
    with pytest.raises(EngramError, match="does not exist"):
        EngramRuntime(tmp_path / "missing.xml")
    with pytest.raises(EngramError, match="should end in .xml or .onnx"):
        EngramRuntime(tmp_path / "model.txt")
    with pytest.raises(EngramError, match="ONNX Runtime runs .onnx files"):
        EngramRuntime(tiny_files["f32"], runtime="ort")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny_files["onnx"].read_bytes()[:500])
    with pytest.raises(EngramError, match="not a readable ONNX file"):
        EngramRuntime(corrupt, runtime="ort")
    truncated_ir = tmp_path / "t.xml"
    truncated_ir.write_text(tiny_files["f32"].read_text()[:300])
    truncated_ir.with_suffix(".bin").write_bytes(tiny_files["f32"].with_suffix(".bin").read_bytes())
    with pytest.raises(EngramError, match="records no fingerprint of its .bin"):
        EngramRuntime(truncated_ir)


@pytest.mark.parametrize("name", ["optimized openvino f32", "optimized openvino bf16", "optimized onnxruntime"])
def test_out_receives_the_output_without_a_copy(runtimes, tiny_config, name):
    """``out=``: the layer writes into the caller's array and returns it, with the values of a call
    without it; the fuse stage's output buffer is the caller's, not one the runtime reuses."""
    runtime = runtimes[name]
    ids, hidden = random_inputs(tiny_config, 5000, 50, 14, seed=4)
    expected = runtime(ids, hidden)
    out = np.full(hidden.shape, np.nan, np.float32)
    assert runtime(ids, hidden, out=out) is out
    np.testing.assert_array_equal(out, expected)
    again = runtime(ids, hidden)  # a later call does not write into the earlier result
    assert again is not out and np.shares_memory(again, out) is False
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda h: np.zeros(h.shape, np.float64), "out must be float32"),
        (lambda h: np.zeros(h.shape[:-1], np.float32), "out must be float32"),
        (lambda h: np.zeros((*h.shape[:-1], 2 * h.shape[-1]), np.float32)[..., ::2], "C-contiguous"),
        (lambda h: h, "must not share memory with hidden_states"),
        (lambda h: [0.0], "out must be a numpy array"),
    ],
)
def test_bad_out_is_refused_and_left_alone(runtimes, tiny_config, bad, message):
    runtime = runtimes["optimized openvino f32"]
    ids, hidden = random_inputs(tiny_config, 5000, 2, 3, seed=4)
    out = bad(hidden)
    before = np.array(out, copy=True)
    with pytest.raises(EngramError, match=message):
        runtime(ids, hidden, out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_the_pipeline_in_memory(tiny_layer, tiny_files):
    """trace -> optimize_graph -> to_openvino with no file written or read gives the model that reading
    the exported file gives (same nodes, same outputs bit for bit); to_openvino lowers a copy, so the
    onnx_ir model it was given is left as it was."""
    from engram_export.onnx.export import optimize_graph, trace
    from engram_export.openvino.compile import read_onnx, to_openvino
    from engram_export.openvino.extension import openvino_core

    model = optimize_graph(trace(tiny_layer))
    before = (model.graph.num_nodes(), list(model.graph.initializers))
    in_memory = to_openvino(model)
    assert (model.graph.num_nodes(), list(model.graph.initializers)) == before
    from_file, _ = read_onnx(tiny_files["onnx"])
    kinds = sorted(op.get_type_name() for op in in_memory.get_ops())
    assert kinds == sorted(op.get_type_name() for op in from_file.get_ops()) and "EngramGatedShortConv" in kinds
    ids, hidden = random_inputs(tiny_layer.config, len(tiny_layer.hashing.lut), 3, 7, seed=2)
    core = openvino_core()
    got, expected = (
        core.compile_model(m, "CPU")({"input_ids": ids, "hidden_states": hidden})[0] for m in (in_memory, from_file)
    )
    np.testing.assert_array_equal(got, expected)


def test_a_broken_graph_is_refused_by_name(tiny_files, tmp_path):
    """An .onnx whose graph reads a value nothing makes (one flipped bit in a name does it) is refused
    with an error that names the file, by compile and the OpenVINO runtime alike."""
    from engram_export.openvino.compile import compile_onnx

    model = onnx.load(str(tiny_files["onnx"]))
    node = next(n for n in model.graph.node if n.op_type == "Add")
    node.input[0] = "made_by_nothing"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(EngramError, match="broken.onnx: the graph is broken"):
        compile_onnx(broken, tmp_path / "b.xml")
    with pytest.raises(EngramError, match="broken.onnx: the graph is broken"):
        EngramRuntime(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]
