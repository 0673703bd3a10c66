"""DeepSeek-V4.1 layers whose table is stored in BF16 or F32 (no ``embed.scale``), end to end.

The table stays in its stored dtype and bytes: ONNX external data of that type pointing into the
checkpoint's shard (hard-linked beside every model), an OpenVINO constant of that type sharing a
mapping of the shard once compiled. Every path is checked against the PyTorch layer reading the same
checkpoint (float64 fuse), with Δ = out - h: f32 paths max |Δ - Δref| / max |Δref| <= 1e-4, bf16 mean
row cosine >= 0.999; image tokens give out == h exactly; looked-up rows equal the table's rows exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engram_export.core.checkpoint import Checkpoint
from engram_export.core.errors import EngramError
from engram_export.folders import compile_folder, export_checkpoint
from engram_export.folders.manifest import read_manifest
from engram_export.folders.synthetic import float_rows_bytes, write_v41_checkpoint
from engram_export.models.deepseek_v41 import open_layer
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing, hash_rows_v41
from engram_export.models.hashing import _next_prime
from engram_export.onnx import op as onnx_op
from engram_export.onnx import op_fp8 as onnx_op_fp8
from engram_export.openvino.extension import openvino_core
from engram_export.runtime import EngramRuntime
from tests.v41_spec import TINY

DTYPES = ["BF16", "F32"]
OV_TYPES = {"BF16": "bf16", "F32": "f32"}
PATHS = ["onnx-ort", "onnx", "f32", "bf16"]


def widen(stored: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of a table's stored bytes [n, d * itemsize]."""
    if dtype == "F32":
        return stored.view(np.float32)
    return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module", params=DTYPES)
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"v41_{request.param}")
    checkpoint = write_v41_checkpoint(
        root / "checkpoint", TINY, seed=4, prefix="model.", tokenizer=True, table_dtype=request.param
    )
    exported = export_checkpoint(checkpoint, root / "onnx")
    ckpt = Checkpoint(checkpoint)
    config = V41Config.from_checkpoint(ckpt)
    hashing = V41Hashing(config)
    return {
        "dtype": request.param,
        "checkpoint": checkpoint,
        "config": config,
        "hashing": hashing,
        "layers": {layer: open_layer(ckpt, config, layer, hashing) for layer in config.layer_ids},
        "onnx": exported,
        "f32": compile_folder(exported, root / "f32", "f32"),
        "bf16": compile_folder(exported, root / "bf16", "bf16"),
    }


def inputs(config, batch, tokens, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, tokens))
    hidden = rng.normal(size=(batch, tokens, config.hc_mult, config.hidden_size)).astype(np.float32)
    return ids, hidden, rng.random((batch, tokens)) > 0.2


@pytest.mark.parametrize("batch,tokens", [(50, 14), (1, 1), (3, 17)])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_pytorch_layer(case, path, batch, tokens):
    runtime = EngramRuntime(case[path.removesuffix("-ort")], runtime="ort" if path.endswith("ort") else "ov")
    for layer in runtime.layer_ids:
        ids, hidden, mask = inputs(case["config"], batch, tokens, seed=batch + tokens + layer)
        got = runtime.layer(layer)(ids, hidden, token_mask=mask)
        with torch.inference_mode():
            expected = case["layers"][layer](
                torch.from_numpy(ids), torch.from_numpy(hidden).double(), torch.from_numpy(mask)
            ).numpy()
        np.testing.assert_array_equal(got[~mask], hidden[~mask])  # image tokens: exactly h
        delta, delta_ref = got - hidden, expected - hidden
        if path == "bf16":
            cosine = (delta * delta_ref).sum(-1)[mask] / (
                np.linalg.norm(delta, axis=-1)[mask] * np.linalg.norm(delta_ref, axis=-1)[mask]
            )
            assert cosine.mean() >= 0.999, (path, cosine.mean())
        else:
            assert np.abs(delta - delta_ref).max() <= 1e-4 * np.abs(delta_ref).max(), path


def test_lookup_gives_the_table_rows(case):
    """The f32 model's lookup and the PyTorch layer's both give the stored rows, exactly."""
    config, hashing = case["config"], case["hashing"]
    ids, _, mask = inputs(config, 4, 9, seed=5)
    rows = hash_rows_v41(
        hashing.lut[ids], mask, hashing.multipliers(3), hashing.primes(3), hashing.pad_id, config.n_head_per_ngram
    )
    stored = float_rows_bytes(config, 3, rows.ravel(), seed=4, table_dtype=case["dtype"])
    expected = widen(stored, case["dtype"]).reshape(4, 9, -1)
    np.testing.assert_array_equal(EngramRuntime(case["f32"]).layer(3).lookup(ids, token_mask=mask), expected)
    with torch.inference_mode():
        layer = case["layers"][3].lookup(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_array_equal(layer, expected)


def test_table_stays_stored_and_linked(case):
    """Every file beside the models is the shard itself (same inode), no .bin or .onnx holds the table,
    and the compiled lookup's table constant has the stored type (not widened, not narrowed)."""
    config = case["config"]
    shards = {p.stat().st_ino for p in case["checkpoint"].glob("*.safetensors")}
    itemsize = {"BF16": 2, "F32": 4}[case["dtype"]]
    table_bytes = min(config.table_rows(layer) * config.head_dim * itemsize for layer in config.layer_ids)
    for kind in ("onnx", "f32", "bf16"):
        linked = list(case[kind].glob("*.safetensors"))
        assert len(linked) == 2 and all(p.stat().st_ino in shards for p in linked), kind
        written = [p for p in case[kind].iterdir() if p.suffix in (".onnx", ".bin")]
        assert all(p.stat().st_size < table_bytes for p in written), kind
        # the manifest hashes whole what was written, the linked shards by size and sampled hash only:
        # writing a folder costs the same whatever the table size
        files = read_manifest(case[kind]).files
        assert {name for name, entry in files.items() if "sha256" in entry} == {p.name for p in written} | (
            {p.with_suffix(".xml").name for p in written if p.suffix == ".bin"}
        ), kind
    # the row kernel reads the table as its stored bytes (u8, each row head_dim * itemsize of them);
    # OpenVINO's Gather reads a constant of the stored type
    for kind in ("f32", "bf16"):
        for kernel, expected in (
            (True, ("u8", config.head_dim * itemsize)),
            (False, (OV_TYPES[case["dtype"]], config.head_dim)),
        ):
            runtime = EngramRuntime(case[kind], lookup_kernel=kernel).layer(3)
            ops = runtime._backend.lookups.compiled.get_runtime_model().get_ops()
            tables = {
                (op.get_rt_info()["outputPrecisions"].astype(str), op.get_output_partial_shape(0).to_shape()[1])
                for op in ops
                if op.get_rt_info()["layerType"].astype(str) == "Const"
                and op.get_output_partial_shape(0).is_static
                and op.get_output_partial_shape(0).to_shape()[0] == config.table_rows(3)
            }
            assert tables == {expected}, (kind, kernel, tables)


def _add_tensor(shard, name: str, dtype: str, shape: list[int], data: bytes) -> None:
    """Append a tensor to a safetensors file (offsets are relative to the data: the others stay valid)."""
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(len(text).to_bytes(8, "little") + text + body + data)


def test_scales_beside_a_float_table_are_refused(tmp_path):
    folder = write_v41_checkpoint(tmp_path / "checkpoint", TINY, tokenizer=True, table_dtype="BF16")
    config = V41Config.from_hf(TINY)
    shard, name = folder / "model-00001-of-00002.safetensors", "layers.1.engram.embed.scale"
    rows = config.table_rows(1)
    _add_tensor(shard, name, "F8_E8M0", [rows, config.head_dim // 32], bytes(rows * config.head_dim // 32))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        EngramError,
        match=r"layers.1.engram.embed.weight is BF16, which takes no scales, but "
        r"the checkpoint also holds layers.1.engram.embed.scale",
    ):
        export_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_op_is_exact_in_every_runtime(dtype, tmp_path):
    """One HashGatherBlocked node: ONNX Runtime (its function body), the ReferenceEvaluator (its numpy
    kernel) and OpenVINO (the extension's converter) give the stored rows exactly."""
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    config = V41Config.from_hf(TINY)
    hashing = V41Hashing(config)
    lut = np.random.default_rng(1).integers(0, config.compressed_vocab_size, config.vocab_size)
    stored = float_rows_bytes(config, 3, np.arange(config.table_rows(3)), seed=9, table_dtype=dtype)
    ids, _, mask = inputs(config, 3, 11, seed=2)
    rows = hash_rows_v41(
        lut[ids], mask, hashing.multipliers(3), hashing.primes(3), hashing.pad_id, config.n_head_per_ngram
    )
    # bf16: a subnormal, -0, the largest finite magnitudes. Not in an f32 table: OpenVINO's CPU plugin
    # flushes f32 constants with subnormals to zero (in a copy)
    if dtype == "BF16":
        stored[rows[0, 0, 0], :8] = np.array([0x0001, 0x8000, 0x7F7F, 0xFF7F], np.uint16).view(np.uint8)
    expected = widen(stored, dtype)[rows].reshape(*ids.shape, -1)
    table = helper.make_tensor(
        "table",
        {"BF16": TensorProto.BFLOAT16, "F32": TensorProto.FLOAT}[dtype],
        [config.table_rows(3), config.head_dim],
        stored.tobytes(),
        raw=True,
    )
    node = helper.make_node(
        onnx_op_fp8.BLOCKED_OP_TYPE,
        onnx_op_fp8.BLOCKED_INPUTS,
        ["out"],
        domain=onnx_op.DOMAIN,
        multipliers=hashing.multipliers(3),
        primes=hashing.primes(3),
        pad_id=hashing.pad_id,
        n_heads=config.n_head_per_ngram,
    )
    graph = helper.make_graph(
        [node],
        "blocked",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
            helper.make_tensor_value_info("token_mask", TensorProto.BOOL, ["b", "t"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", None])],
        [onnx.numpy_helper.from_array(lut.astype(np.int64), "compress_lut"), table],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(onnx_op.DOMAIN, 1)],
        functions=[onnx_op_fp8.hash_gather_blocked_function(config.max_ngram_size, 23)],
    )
    model.ir_version = 11
    onnx.checker.check_model(model, full_check=True)
    feeds = {"input_ids": ids, "token_mask": mask}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    evaluator = ReferenceEvaluator(model, new_ops=[onnx_op_fp8.HashGatherBlocked])
    np.testing.assert_array_equal(evaluator.run(None, feeds)[0], expected)
    onnx.save(model, tmp_path / "blocked.onnx")
    ov_model = openvino_core().read_model(str(tmp_path / "blocked.onnx"))
    for hint in ("f32", "bf16"):
        got = openvino_core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})(feeds)[0]
        np.testing.assert_array_equal(got, expected)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _with_table_sizes(config: dict) -> dict:
    """``config`` with ``engram_num_embeddings`` set to its layers' head-prime sums (spec section 8)."""
    seen, sizes = set(), []
    for _ in config["engram_layer_ids"]:
        total = 0
        for _ in range(2, config["engram_max_ngram_size"] + 1):
            candidate = config["engram_vocab_size"] - 1
            for _ in range(config["engram_n_heads"]):
                candidate = _next_prime(candidate, seen)
                seen.add(candidate)
                total += candidate
        sizes.append(total)
    return {**config, "engram_num_embeddings": sizes}


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_a_large_float_table_is_mapped_not_read(tmp_path, dtype):
    """A 2 GiB bf16 or f32 table written sparsely: loading and running the compiled model grows resident
    memory by far less than the table (for f32, the runtime skips the CPU plugin's scan of f32 constants
    for subnormals), and the looked-up rows are the stored ones."""
    size = {"BF16": 4_200_000, "F32": 2_100_000}[dtype]
    config_dict = _with_table_sizes({**TINY, "engram_layer_ids": [1], "engram_vocab_size": size})
    config = V41Config.from_hf(config_dict)
    hashing = V41Hashing(config)
    ids, _, mask = inputs(config, 8, 16, seed=11)
    ids %= config.compressed_vocab_size  # the test tokenizer: id i -> i below the compressed size
    rows = hashing.rows(ids, mask, 1)
    table_bytes = config.table_rows(1) * config.head_dim * {"BF16": 2, "F32": 4}[dtype]
    assert table_bytes > 2**31
    checkpoint = write_v41_checkpoint(
        tmp_path / "checkpoint", config_dict, tokenizer=True, table_dtype=dtype, rows={1: rows.ravel()}
    )
    compiled = compile_folder(export_checkpoint(checkpoint, tmp_path / "onnx"), tmp_path / "f32", "f32")
    before = _rss()
    layer = EngramRuntime(compiled).layer(1)
    got = layer.lookup(ids, token_mask=mask)
    assert _rss() - before < table_bytes // 8, (_rss() - before) / 2**20
    assert np.float32(2.0**-130) * np.float32(1) > 0  # loading left this thread's subnormals alone
    stored = float_rows_bytes(config, 1, rows.ravel(), table_dtype=dtype)
    np.testing.assert_array_equal(got, widen(stored, dtype).reshape(*ids.shape, -1))
