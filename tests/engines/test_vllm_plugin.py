"""The vLLM 0.33.0 plug-in (``engram_export/engines/vllm_plugin.py``) against vLLM's own released code, on CPU.

The plug-in is loaded the way vLLM loads it, through ``vllm.plugins.load_general_plugins()`` and the installed
entry point (``VLLM_PLUGINS=engram_export``); the ``plugins`` fixture resets vLLM's ``plugins_loaded`` flag
before each test and, after it, puts back every class attribute and module function the plug-in replaced and
forgets the opened tables (``settings._opened``).

The reference is vLLM's own ``ParallelEngramEmbedding``: built as each TP rank, loaded with the tiny V4.1
checkpoint's tables through its own weight loader, its own Triton lookup kernel run in the interpreter. The hash
ids are vLLM's own Triton hash kernel's, of real prose tokenized by the real BERT tokenizer. The plug-in's
``lookup`` must equal vLLM's bit for bit in both ``out`` forms (bf16, and packed uint8 rows, also as a slice
of ``EngramBatch``'s ``[tokens, layers, heads, width]`` buffer), whatever serves the rows: the folder mapped,
a calibrated folder in tiers with misses, or shards on a Ray cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import types
from pathlib import Path

import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.engines import settings, vllm_plugin
from tests.engines import helpers

PROSE = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "I thought I would sail about a little and see the watery part of the world.",
    "The tables of an Engram layer hold one row per hashed n-gram; the engine reads them before the layer.",
]
# what the plug-in replaces: (owner, attribute); "weight_utils" is vLLM's weight_utils module
REPLACED = {
    ("ParallelEngramEmbedding", "_allocate_weights"),
    ("ParallelEngramEmbedding", "lookup"),
    ("ParallelEngramEmbedding", "_storage"),
    ("ParallelEngramEmbedding", "_engram_export"),
    ("Engram", "_create_embedding"),
    ("Engram", "_finish_prefetch"),
    ("weight_utils", "should_skip_weight"),
}
TABLE_SUFFIXES = (".engram.embed.weight", ".engram.embed.scale")


def _owners():
    from vllm.model_executor.model_loader import weight_utils

    engram = helpers.vllm_engram_module()
    return {"ParallelEngramEmbedding": engram.ParallelEngramEmbedding, "Engram": engram.Engram}, weight_utils


def _snapshot() -> dict:
    classes, weight_utils = _owners()
    state = {name: dict(vars(owner)) for name, owner in classes.items()}
    state["weight_utils"] = {"should_skip_weight": weight_utils.should_skip_weight}
    return state


def _changed(before: dict) -> set[tuple[str, str]]:
    """(owner, attribute) that differ from ``before`` (added, removed or replaced)."""
    now = _snapshot()
    return {
        (owner, name)
        for owner in before
        for name in set(before[owner]) | set(now[owner])
        if before[owner].get(name, None) is not now[owner].get(name, None)
    }


@pytest.fixture
def plugins(monkeypatch, vllm_engram):
    """``.load()``: ``vllm.plugins.load_general_plugins()`` as a fresh vLLM process runs it (``plugins_loaded``
    reset), only our entry point allowed; no ``ENGRAM_EXPORT_*`` unless the test sets it. ``.before``: vLLM's
    attributes before the test (``_changed``). After the test, every attribute the plug-in replaced is vLLM's
    again and the opened tables are forgotten. (``vllm_engram``: vLLM's kernels checked to be interpreted.)"""
    import vllm.plugins

    for key in list(os.environ):
        if key.startswith(settings.PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VLLM_PLUGINS", "engram_export")
    classes, weight_utils = _owners()
    before, loaded = _snapshot(), vllm.plugins.plugins_loaded
    assert not getattr(classes["ParallelEngramEmbedding"], "_engram_export", False), "vLLM patched before the test"
    settings._opened.clear()

    def load():
        vllm.plugins.plugins_loaded = False
        vllm.plugins.load_general_plugins()

    yield types.SimpleNamespace(load=load, before=before)
    for name, owner in classes.items():
        for attribute in set(vars(owner)) - set(before[name]):
            delattr(owner, attribute)
        for attribute, value in before[name].items():
            if vars(owner).get(attribute) is not value:
                setattr(owner, attribute, value)
    weight_utils.should_skip_weight = before["weight_utils"]["should_skip_weight"]
    vllm.plugins.plugins_loaded = loaded
    settings._opened.clear()
    assert not _changed(before)


def configure(monkeypatch, **values) -> None:
    """``ENGRAM_EXPORT_<KEY>=value`` for each ``key=value``."""
    for key, value in values.items():
        monkeypatch.setenv(settings.PREFIX + key.upper(), str(value))


# ---------------------------------------------------------------- checkpoints, ids and vLLM's own lookups


def _edge_scales(checkpoint: Path) -> None:
    """Scale bytes 0 and 255 in every table of ``checkpoint`` (one row in 7 each, in place): the bytes vLLM's
    kernel decodes as 0 and inf, and the E8M0 spec as 2^-127 and NaN (a trained table holds neither)."""
    import numpy as np

    for path in checkpoint.glob("*.safetensors"):
        with open(path, "r+b") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
            for name, tensor in header.items():
                if name.endswith(".engram.embed.scale"):
                    start, end = (8 + size + offset for offset in tensor["data_offsets"])
                    file.seek(start)
                    scales = np.frombuffer(file.read(end - start), np.uint8).reshape(tensor["shape"]).copy()
                    scales[0::7, 0] = 0
                    scales[1::7, -1] = 255
                    file.seek(start)
                    file.write(scales.tobytes())


@pytest.fixture(scope="module")
def wide(v41, tmp_path_factory):
    """``v41``'s model with 5 heads a n-gram order: 10 hash columns, which 3 or 4 TP ranks do not divide
    (the last rank has padded head slots), and scale bytes 0 and 255 in its tables. A namespace as ``v41``'s
    (``tokenizer`` is the same)."""
    from engram_export.folders import export_checkpoint
    from engram_export.folders.synthetic import write_v41_checkpoint

    spec = dict(vars(v41.config), engram_n_heads=5)
    spec["engram_num_embeddings"] = [0] * len(spec["engram_layer_ids"])
    layout = helpers.vllm_engram_module().EngramLayout(types.SimpleNamespace(**spec))
    spec["engram_num_embeddings"] = [sum(p for order in layer for p in order) for layer in layout.primes]
    root = tmp_path_factory.mktemp("wide")
    checkpoint = write_v41_checkpoint(root / "ckpt", spec, seed=7, table_dtype="F8_E4M3")
    shutil.copyfile(v41.checkpoint / "tokenizer.json", checkpoint / "tokenizer.json")
    _edge_scales(checkpoint)
    config = types.SimpleNamespace(**spec)
    return types.SimpleNamespace(
        checkpoint=checkpoint,
        folder=export_checkpoint(checkpoint, root / "wide"),
        config=config,
        tokenizer=v41.tokenizer,
        tables=helpers.checkpoint_tables(checkpoint, config),
    )


def hash_ids(model) -> torch.Tensor:
    """``[tokens, layers, columns]`` int32: vLLM's Triton hash kernel on ``PROSE`` tokenized by the model's
    BERT tokenizer, then -1 (vLLM's dead id) in a column, over a whole token, and a column given ids of
    another column's bucket (the last one's: another TP rank's rows)."""
    token_map, _ = helpers.token_map(model.tokenizer)
    sequences = [model.tokenizer(text)["input_ids"] for text in PROSE]
    ids = helpers.vllm_hash_ids(model.config, token_map, sequences).clone()
    assert ids.dtype == torch.int32 and len(ids) > 80 and (ids >= 0).all()
    ids[3, :, 1] = -1
    ids[5] = -1
    ids[9, :, 0] = ids[10, :, -1]
    return ids


def reads(embedding, ids: torch.Tensor, layer_index: int) -> dict[str, torch.Tensor]:
    """``embedding.lookup`` of layer ``layer_index``'s ids as vLLM's callers pass them (a column slice of the
    hash ids, not contiguous) into each ``out``: bf16 ``[T, heads, dim]`` (as ``Engram.prepare_embeddings``),
    packed ``[T, heads, dim + dim/32]`` (background, as on the prefetch stream), and packed as the slice
    ``[:, layer]`` of ``EngramBatch``'s ``[T, layers, heads, width]`` buffer (token stride != heads * width).
    Each ``out`` starts as a filler that a row never written would show. bf16 compared as its bits."""
    tokens, layers = ids.shape[0], ids.shape[1]
    heads, dim = embedding.part_n_hash_cols, embedding.dim
    width = dim + dim // helpers.FP8_BLOCK
    layer_ids = ids[:, layer_index]
    assert not layer_ids.is_contiguous()
    bf16 = torch.full((tokens, heads, dim), 7.0, dtype=torch.bfloat16)
    embedding.lookup(layer_ids, bf16)
    packed = torch.full((tokens, heads, width), 0xAB, dtype=torch.uint8)
    embedding.lookup(layer_ids, packed, background=True)
    if getattr(type(embedding), "_engram_export", False):  # the plug-in's: written when the layer waits
        columns = min(heads, embedding.n_hash_cols - embedding.head_start)  # a last rank's padding is zeroed
        assert (packed[:, :columns] == 0xAB).all()
        vllm_plugin.finish_lookup(embedding)
    batch = torch.full((tokens, layers, heads, width), 0xCD, dtype=torch.uint8)
    rows = batch[:, layer_index]
    assert rows.stride(0) == layers * heads * width != heads * width
    embedding.lookup(layer_ids, rows)
    return {"bf16": bf16.view(torch.int16), "packed": packed, "batch": batch}


def vllm_reads(model, ids: torch.Tensor, tp_size: int) -> dict[tuple[int, int], dict]:
    """(rank, layer index) -> ``reads`` of vLLM's own ``ParallelEngramEmbedding`` as that TP rank, loaded
    with the checkpoint's tables by its own weight loader (vLLM unpatched)."""
    engram = helpers.vllm_engram_module()
    assert not getattr(engram.ParallelEngramEmbedding, "_engram_export", False)
    layout = engram.EngramLayout(model.config)
    found = {}
    for index, layer in enumerate(layout.layer_ids):
        sizes = tuple(size for order in layout.primes[index] for size in order)
        for rank in range(tp_size):
            embedding = helpers.make_vllm_embedding(layout.num_embeddings[index], layout.head_dim, sizes, tp_size, rank)
            helpers.load_full_table(embedding, *model.tables[layer])
            with helpers.vllm_tp(tp_size, rank):
                found[rank, index] = reads(embedding, ids, index)
    return found


@pytest.fixture(scope="module")
def v41_ids(v41):
    return hash_ids(v41)


@pytest.fixture(scope="module")
def v41_reference(v41, v41_ids):
    """vLLM's own lookups of ``v41_ids`` at TP 1 and 2, computed once, before any test patches vLLM."""
    return {tp: vllm_reads(v41, v41_ids, tp) for tp in (1, 2)}


def plugin_embedding(layout, index: int, tp_size: int = 1, tp_rank: int = 0, cpu_offload: bool = False):
    """Layer ``layout.layer_ids[index]``'s embedding as vLLM's model builds it: ``Engram._create_embedding``
    (the plug-in's, once loaded) as TP rank ``tp_rank`` of ``tp_size``, under an engram config."""
    vllm_config = types.SimpleNamespace(
        engram_config=types.SimpleNamespace(cpu_offload=cpu_offload, dp_shared_memory=False, use_thp=False)
    )
    with helpers.vllm_tp(tp_size, tp_rank) as engram, pytest.MonkeyPatch.context() as patch:
        patch.setattr(engram, "get_current_vllm_config", lambda: vllm_config)
        patch.setattr(engram, "is_uva_available", lambda: True)  # vLLM's check for cpu_offload (no CUDA here)
        return engram.Engram._create_embedding(None, layout, index)


def assert_no_table(embedding) -> None:
    """The embedding holds no table memory and no table parameter (nothing for the loader to fill)."""
    assert embedding.weight.is_meta and embedding.weight_scale_inv.is_meta
    assert embedding.weight.shape == (embedding.part_num_embeddings, embedding.dim)
    assert embedding.weight.dtype == torch.float8_e4m3fn and embedding.weight_scale_inv.dtype == torch.uint8
    assert dict(embedding.named_parameters()) == {} and dict(embedding.named_buffers()) == {}


def assert_plugin_equals_vllm(model, ids, reference: dict, tp_size: int) -> None:
    """For each rank and layer: the plug-in's embedding (built by ``_create_embedding``) holds no table, and
    its lookups equal vLLM's own bit for bit."""
    engram = helpers.vllm_engram_module()
    layout = engram.EngramLayout(model.config)
    for index, _layer in enumerate(layout.layer_ids):
        for rank in range(tp_size):
            embedding = plugin_embedding(layout, index, tp_size, rank)
            assert_no_table(embedding)
            expected, found = reference[rank, index], reads(embedding, ids, index)
            for form in expected:
                assert torch.equal(found[form], expected[form]), (form, tp_size, rank, index)


# ---------------------------------------------------------------- 1. inert without ENGRAM_EXPORT_*


def test_inert_without_settings(plugins, monkeypatch, v41):
    """Without ``ENGRAM_EXPORT_*`` vLLM's loader runs our ``register`` and nothing changes: vLLM's own
    methods, its own weight filter (which reads the tables), its own table allocation."""
    from vllm.model_executor.model_loader import weight_utils

    called = []
    register = vllm_plugin.register
    monkeypatch.setattr(vllm_plugin, "register", lambda: called.append(1) or register())
    plugins.load()
    assert called == [1]
    assert not _changed(plugins.before)
    names = [name for name, _ in weight_utils.safetensors_weights_iterator(_files(v41.checkpoint), False)]
    assert sum(name.endswith(TABLE_SUFFIXES) for name in names) == 2 * len(v41.config.engram_layer_ids)
    layout = helpers.vllm_engram_module().EngramLayout(v41.config)
    embedding = plugin_embedding(layout, 0)
    assert not embedding.weight.is_meta and set(dict(embedding.named_parameters())) == {"weight", "weight_scale_inv"}


# ---------------------------------------------------------------- 2. configured: vLLM's lookups, bit for bit


@pytest.mark.parametrize("tp_size", [1, 2])
def test_lookup_equals_vllm(plugins, monkeypatch, v41, v41_ids, v41_reference, tp_size):
    """The mapped folder: the plug-in replaces exactly what it says, builds embeddings without table memory,
    and its lookups equal vLLM's kernel on its own loaded table, at each TP rank, in every ``out`` form."""
    configure(monkeypatch, rows=v41.folder)
    plugins.load()
    assert _changed(plugins.before) == REPLACED
    assert not settings._opened  # checked, not opened: a process that builds no model holds no table
    patched = _snapshot()
    plugins.load()  # vLLM may load plug-ins again in one process: nothing replaced twice
    assert not _changed(patched)
    assert_plugin_equals_vllm(v41, v41_ids, v41_reference[tp_size], tp_size)
    rows = settings.open_rows()
    assert rows.layer_ids == v41.config.engram_layer_ids
    assert all(stats["reads"] == 3 * tp_size and stats["rows"] > 0 for stats in rows.stats().values())
    if tp_size == 1:  # vLLM's own forward (TP 1, no DP) through the plug-in's lookup
        layout = helpers.vllm_engram_module().EngramLayout(v41.config)
        embedding = plugin_embedding(layout, 1, cpu_offload=True)
        assert_no_table(embedding)
        with torch.no_grad():
            forward = embedding(v41_ids[:, 1])
        assert torch.equal(forward.view(torch.int16), v41_reference[1][0, 1]["bf16"])


def test_last_rank_padded_heads(plugins, monkeypatch, wide):
    """10 hash columns over 3 and 4 TP ranks: the last rank's slots past the last column are zero rows in
    vLLM's kernel (for its all-gather), and in the plug-in's lookup. Its tables' scale bytes 0 and 255 are
    decoded as vLLM's kernel decodes them (0 and inf: NaN and inf rows)."""
    ids = hash_ids(wide)
    reference = {tp: vllm_reads(wide, ids, tp) for tp in (3, 4)}
    edges = torch.cat([reference[3][rank, 0]["bf16"].view(torch.bfloat16).flatten() for rank in range(3)])
    assert edges.isinf().any() and edges.isnan().any()  # the tables' scale bytes 255, as vLLM decodes them
    for tp, padded in ((3, 2), (4, 2)):
        last = reference[tp][tp - 1, 0]
        assert last["bf16"].shape[1] - padded == wide.config.engram_n_heads * 2 - (tp - 1) * last["bf16"].shape[1]
        assert not last["bf16"][:, -padded:].any() and not last["packed"][:, -padded:].any()
        assert last["bf16"][:, :-padded].any()
    configure(monkeypatch, rows=wide.folder)
    plugins.load()
    for tp in (3, 4):
        assert_plugin_equals_vllm(wide, ids, reference[tp], tp)


@pytest.fixture(scope="module")
def calibrated(v41, tmp_path_factory):
    """``v41``'s folder calibrated on package prose with 30% of its rows hot."""
    from engram_export.folders.calibration import calibrate
    from tests.helpers import package_prose

    root = tmp_path_factory.mktemp("calibrated")
    text = root / "prose.txt"
    text.write_text(package_prose()[:60_000])
    calibrate(v41.folder, root / "tiered", [text], "30%")
    return root / "tiered"


@pytest.mark.parametrize("tp_size", [1, 2])
def test_tiered_folder_with_misses(plugins, monkeypatch, v41, v41_ids, v41_reference, calibrated, tp_size):
    """A calibrated folder in tiers, a 16 KiB cache: the same rows as vLLM's table, hot rows from memory
    and the others read from the file."""
    configure(monkeypatch, rows=calibrated, table_memory="tiered", cache_budget="16KiB")
    plugins.load()
    assert_plugin_equals_vllm(v41, v41_ids, v41_reference[tp_size], tp_size)
    for layer, stats in settings.open_rows().stats().items():
        assert stats["hot_hits"] > 0 and stats["rows_read"] > 0, (layer, stats)


def _files(checkpoint: Path) -> list[str]:
    return sorted(str(path) for path in checkpoint.glob("*.safetensors"))


def test_checkpoint_tables_are_never_read(plugins, monkeypatch, v41):
    """vLLM's own ``safetensors_weights_iterator`` over the checkpoint skips the tables before reading them
    (``get_tensor`` is never called for them) and yields every other tensor as before."""
    from vllm.model_executor.model_loader import weight_utils

    files = _files(v41.checkpoint)
    before = {name: tensor for name, tensor in weight_utils.safetensors_weights_iterator(files, False)}
    configure(monkeypatch, rows=v41.folder)
    plugins.load()
    read: list[str] = []
    monkeypatch.setattr(weight_utils, "safe_open", helpers.recording_safe_open(weight_utils.safe_open, read))
    after = dict(weight_utils.safetensors_weights_iterator(files, False))
    tables = {name for name in before if name.endswith(TABLE_SUFFIXES)}
    assert len(tables) == 2 * len(v41.config.engram_layer_ids)
    assert set(after) == set(before) - tables and sorted(read) == sorted(after)
    assert all(torch.equal(after[name], before[name]) for name in after)


# ---------------------------------------------------------------- 3. refusals at engine start, one line each


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_missing_folder_refused_at_load(plugins, monkeypatch, tmp_path):
    """vLLM calls each plug-in's function unguarded: our refusal stops the engine's start."""
    configure(monkeypatch, rows=tmp_path / "missing")
    with pytest.raises(EngramError) as error:
        plugins.load()
    message = _one_line(error)
    assert "ENGRAM_EXPORT_ROWS=" in message and str(tmp_path / "missing") in message
    assert not _changed(plugins.before)


def _other_config(config, **fields):
    return types.SimpleNamespace(**{**vars(config), **fields})


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A folder of the demo family (not V4.1): ``tiny``'s layer 1, not FP8."""
    from engram_export import load_config
    from engram_export.folders import export_folder

    config = load_config("tiny").replace(layer_ids=[1])
    return export_folder(config, tmp_path_factory.mktemp("demo") / "tiny", seed=0, optimize=False)


def test_folder_of_another_model_refused_at_create_embedding(plugins, monkeypatch, v41, wide, demo_folder):
    """The folder opens at load (it is a good folder); the model's embedding of a layer whose table is not the
    folder's is refused when vLLM builds it, naming the layer: other head counts (table size), other layer
    ids, another ``engram_vocab_size`` with the same table size (other primes), the demo family (not FP8)."""
    engram = helpers.vllm_engram_module()
    cases = [
        (wide.folder, v41.config, 0, r"layer 1 of .* is \d+ rows of 64 e4m3/e8m0/32; the engine's model wants 4038"),
        (v41.folder, _other_config(v41.config, engram_layer_ids=[1, 4]), 1, "has an Engram layer 4; .* has layers"),
        (v41.folder, _other_config(v41.config, engram_vocab_size=991), 0, "layer 1 of .* other head sizes"),
        (demo_folder, v41.config, 0, "layer 1 of .* wants 4038 rows of 64 e4m3/e8m0/32"),
    ]
    for folder, config, index, match in cases:
        configure(monkeypatch, rows=folder)
        plugins.load()
        layout = engram.EngramLayout(config)
        with pytest.raises(EngramError, match=match) as error:
            plugin_embedding(layout, index)
        _one_line(error)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tables_nobody_serves_refused_at_load(plugins, monkeypatch, v41):
    """``ray://nothing`` where no Ray cluster answers: refused at load, in one line (with a cluster and no
    tables of that name: ``test_ray_served_tables``)."""
    address = f"127.0.0.1:{_closed_port()}"
    configure(monkeypatch, rows=v41.folder, tables="ray://nothing", ray_address=address)
    with pytest.raises(EngramError, match="cannot reach a Ray cluster|no tables named 'nothing'") as error:
        plugins.load()
    assert "ENGRAM_EXPORT_ROWS=" in _one_line(error)
    assert not _changed(plugins.before)


def test_changed_vllm_signature_refused_at_load(plugins, monkeypatch, v41):
    """A vLLM whose ``ParallelEngramEmbedding.lookup`` takes other parameters: refused, naming it, before
    anything is replaced."""
    engram = helpers.vllm_engram_module()

    def lookup(self, indices, out, background=False, stream=None):
        raise AssertionError("never called")

    monkeypatch.setattr(engram.ParallelEngramEmbedding, "lookup", lookup)
    configure(monkeypatch, rows=v41.folder)
    with pytest.raises(EngramError, match=r"vLLM's ParallelEngramEmbedding\.lookup\(") as error:
        plugins.load()
    _one_line(error)
    assert vars(engram.ParallelEngramEmbedding)["lookup"] is lookup
    assert _changed(plugins.before) == {("ParallelEngramEmbedding", "lookup")}


# ---------------------------------------------------------------- 4. what the plug-in cannot serve, refused


def test_storage_refused(plugins, monkeypatch, v41):
    """``_storage`` (the GB200 DP peer exchange reads the raw table through it): refused in one line."""
    configure(monkeypatch, rows=v41.folder)
    plugins.load()
    embedding = plugin_embedding(helpers.vllm_engram_module().EngramLayout(v41.config), 0, cpu_offload=True)
    with pytest.raises(EngramError, match="raw table memory") as error:
        embedding._storage()
    _one_line(error)


def test_lookup_in_a_cuda_graph_capture_refused(plugins, monkeypatch, v41, v41_ids):
    """A lookup vLLM would capture in a CUDA graph (``cpu_offload=False``, cudagraph mode FULL) is refused in
    one line before anything is read: a graph cannot replay a host read."""
    configure(monkeypatch, rows=v41.folder)
    plugins.load()
    embedding = plugin_embedding(helpers.vllm_engram_module().EngramLayout(v41.config), 0)
    out = torch.zeros((len(v41_ids), embedding.part_n_hash_cols, embedding.dim), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(EngramError, match="capturing the Engram lookup in a CUDA graph") as error:
        embedding.lookup(v41_ids[:, 0], out)
    _one_line(error)
    assert not out.any() and settings.open_rows()[v41.config.engram_layer_ids[0]].stats()["reads"] == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    embedding.lookup(v41_ids[:, 0], out)
    assert out.any()


def test_background_lookup_lands_when_the_layer_waits(plugins, monkeypatch, v41, v41_ids, v41_reference):
    """vLLM's prefetch: ``_start_prefetch``'s background lookup returns before its rows are read; the patched
    ``Engram._finish_prefetch`` copies them into ``out`` and then makes vLLM's own wait on the event (the
    stream stands in for CUDA's here); the row API records that wait. Host ids out of the table are refused
    at the lookup, in one line, with nothing left pending."""
    configure(monkeypatch, rows=v41.folder)
    plugins.load()
    engram = helpers.vllm_engram_module()
    embedding = plugin_embedding(engram.EngramLayout(v41.config), 0, cpu_offload=True)
    width = embedding.dim + embedding.dim // helpers.FP8_BLOCK
    packed = torch.full((len(v41_ids), embedding.part_n_hash_cols, width), 0xAB, dtype=torch.uint8)
    embedding.lookup(v41_ids[:, 0], packed, background=True)
    assert (packed == 0xAB).all()
    waits = []
    stream = types.SimpleNamespace(wait_event=lambda event: waits.append((event, packed.clone())))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    layer = types.SimpleNamespace(embed_tokens=embedding)
    calls = len(embedding._engram_rows.recent())
    engram.Engram._finish_prefetch(layer, "prefetch done")
    assert len(waits) == 1 and waits[0][0] == "prefetch done"
    assert len(embedding._engram_rows.recent()) == calls + 1  # the layer's wait, recorded by the row API
    assert torch.equal(waits[0][1], v41_reference[1][0, 0]["packed"])  # copied before vLLM's wait
    engram.Engram._finish_prefetch(layer, "prefetch done")  # nothing pending: vLLM's wait only
    assert len(waits) == 2

    wrong = v41_ids[:, 0].clone()
    wrong[4, 0] = -5  # no id of the table (the hash never makes one): refused by the row API
    with pytest.raises(EngramError, match="-5") as error:
        embedding.lookup(wrong, packed, background=True)
    _one_line(error)
    engram.Engram._finish_prefetch(layer, "prefetch done")  # nothing was left pending
    assert len(waits) == 3


# ---------------------------------------------------------------- Ray-served tables


@pytest.fixture(scope="module")
def cluster():
    """A one-node local Ray cluster (127.0.0.1 only, token auth, as ``tests/test_sharding.py``'s) for this
    module; ``RAY_ADDRESS`` set."""
    import secrets

    environment = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node's address is 127.0.0.1: nothing listens outside
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment.items():
            patch.setenv(key, value)
        import ray
        from ray._private import ray_constants
        from ray._private.authentication_test_utils import reset_auth_token_state
        from ray.cluster_utils import Cluster

        from engram_export.sharding.names import NAMESPACE

        # Ray reads these when first imported (an earlier test may have imported it) and caches its token
        # (another module's cluster had another one): read again, as Ray's own tests do
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        reset_auth_token_state()
        nodes = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 128 << 20, "include_dashboard": False},
        )
        try:
            ray.init(address=nodes.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
            address = ray.get_runtime_context().gcs_address
            assert address.startswith("127.0.0.1:"), address
            patch.setenv("RAY_ADDRESS", address)
            yield ray
        finally:
            ray.shutdown()
            nodes.shutdown()
    reset_auth_token_state()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_served_tables(plugins, monkeypatch, cluster, v41, v41_ids, v41_reference):
    """``ENGRAM_EXPORT_TABLES=ray://NAME``: two shards serve the folder's tables; the plug-in's lookups equal
    vLLM's at TP 1 and 2, the rows coming from the shards. ``ray://nothing`` on this cluster is refused."""
    from engram_export.sharding.cluster import serve_tables, stop_tables

    configure(monkeypatch, rows=v41.folder, tables="ray://nothing")
    with pytest.raises(EngramError, match="no tables named 'nothing'") as error:
        plugins.load()
    _one_line(error)
    serve_tables(v41.folder, "vllm-plugin", shards=2)
    try:
        configure(monkeypatch, tables="ray://vllm-plugin", shard_deadline=120)  # a loaded CI machine: first reads
        plugins.load()
        for tp_size in (1, 2):
            assert_plugin_equals_vllm(v41, v41_ids, v41_reference[tp_size], tp_size)
        for layer, stats in settings.open_rows().stats().items():
            assert stats["remote_calls"] > 0, (layer, stats)
    finally:
        stop_tables("vllm-plugin")
