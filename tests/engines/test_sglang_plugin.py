"""SGLang 0.5.23's plug-in (``engram_export/engines/sglang_plugin.py``) loaded through SGLang's own
``sglang.srt.plugins.load_plugins()`` (``SGLANG_PLUGINS=engram_export``, the entry point of the installed
metadata) and checked against SGLang's own released code on CPU: its ``EngramEmbedding`` (torch path) loaded
with the tiny V4.1 checkpoint's tables by its own weight loader, its ``EngramRowStager._gather`` and its
checkpoint iterators. Hash ids are SGLang's own ``compute_engram_hash_ids`` of real prose through the real
BERT tokenizer's token map.

The ``load_plugin`` fixture loads the plug-in in this process and undoes it after the test: SGLang's
once-per-process flag, its ``HookRegistry`` (whose ``reset`` forgets the hooks but leaves them patched: every
patched binding, ``from X import Y`` copies included, is put back here), the plug-in's opened folders and
placeholders, the environment. SGLang's own results are computed before any plug-in is loaded (a hooked
method is the class's: an embedding built before the hooks would read through them too).
"""

from __future__ import annotations

import logging
import os
import pkgutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engram_export.core.errors import EngramError
from tests.engines import helpers
from tests.helpers import package_prose

ENTRY = "engram_export"
EXECUTED = f"Executed general plugin: {ENTRY}"
FAILED = f"Failed to execute general plugin: {ENTRY}"
TABLES = (".engram.embed.weight", ".engram.embed.scale")


def _plugin():
    from engram_export.engines import sglang_plugin

    return sglang_plugin


def _resolve(target: str):
    """The object owning ``target``'s attribute, the attribute's name and its raw value (a class's own
    ``__dict__`` entry, so that restoring it puts back exactly what was there)."""
    owner_path, _, name = target.rpartition(".")
    owner = pkgutil.resolve_name(owner_path)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    return owner, name, raw


def _bindings() -> dict[str, object]:
    """The raw value of every attribute the plug-in may hook."""
    return {target: _resolve(target)[2] for target in _plugin().REPLACED}


def _hooked() -> list[str]:
    """What is hooked now: targets, and the loader's ``from weight_utils import`` copies of the iterators."""
    from sglang.srt.model_loader import loader

    found = [target for target, raw in _bindings().items() if hasattr(raw, "__wrapped__")]
    names = [target.rpartition(".")[2] for target in _plugin().REPLACED if ".weight_utils." in target]
    return found + [name for name in names if hasattr(getattr(loader, name), "__wrapped__")]


def _restore(saved: dict[str, object]) -> None:
    """Put back what ``HookRegistry.apply_hooks`` patched: the attribute, and every module global it
    propagated the patch to (``_propagate_patch``: ``from X import Y`` bindings)."""
    for target, original in saved.items():
        owner, name, current = _resolve(target)
        if current is original:
            continue
        setattr(owner, name, original)
        for module in list(sys.modules.values()):
            if isinstance(module, types.ModuleType):
                for key, value in list(vars(module).items()):
                    if value is current:
                        setattr(module, key, original)


@pytest.fixture
def load_plugin(monkeypatch):
    """``load(**settings)``: ``ENGRAM_EXPORT_<KEY>=value`` for each setting (none: inert), then SGLang's
    ``load_plugins()`` as a fresh process runs it; everything it did is undone after the test."""
    import sglang.srt.plugins as plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from engram_export.engines import settings

    for key in list(os.environ):
        if key.startswith("ENGRAM_EXPORT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SGLANG_PLUGINS", ENTRY)
    assert not HookRegistry._hooks and not HookRegistry._patched and not _hooked(), "left over by an earlier test"
    saved: dict[str, object] = {}

    def load(**values):
        for key, value in values.items():
            monkeypatch.setenv(f"ENGRAM_EXPORT_{key.upper()}", str(value))
        saved.update(_bindings())
        plugins._plugins_loaded = False
        plugins.load_plugins()

    try:
        yield load
    finally:
        _restore(saved)
        HookRegistry.reset()
        plugins._plugins_loaded = False
        settings._opened.clear()
        _plugin()._placeholders.clear()
        helpers.sglang_parallel_reset()
    assert not _hooked()


def _bits(values: torch.Tensor) -> torch.Tensor:
    """bf16 values as their bits: equal bits, not only equal values (-0.0, NaN)."""
    return values.view(torch.int16)


def _sglang_modules():
    import sglang.srt.layers.engram as engram
    import sglang.srt.layers.engram_staging as staging

    return engram, staging


def _pinless_empty():
    """``torch.empty`` without ``pin_memory`` (SGLang's ``_gather`` pins its output; CPU torch cannot)."""
    empty = torch.empty

    def unpinned(*args, pin_memory=False, **kwargs):
        return empty(*args, **kwargs)

    return unpinned


def _stub_stager(staging):
    """An ``EngramRowStager`` as far as ``_gather`` reads it (its ``__init__`` makes a CUDA stream)."""
    stager = object.__new__(staging.EngramRowStager)
    stager.pool = ThreadPoolExecutor(4)
    return stager


@pytest.fixture(scope="module")
def reference(v41, tmp_path_factory):
    """SGLang's own results, before any plug-in: hash ids of prose (``[tokens, layers, columns]``, some -1),
    and per layer its ``EngramEmbedding`` loaded with the checkpoint's tables by its own loader: ``owned``
    ``{tp_size: [rows of each rank]}`` and ``forward`` (TP 1); ``gathered`` the codes and scale bytes its
    stager's ``_gather`` gives for the layer's ids without the -1s; ``weights`` its checkpoint iterators
    over ``files`` (the checkpoint's, and files without a table around them)."""
    engram, staging = _sglang_modules()
    assert not hasattr(engram.EngramEmbedding.__init__, "__wrapped__"), "SGLang is hooked already"
    from safetensors.torch import save_file
    from sglang.srt.model_loader import weight_utils

    layout = engram.EngramLayout.from_config(v41.config)
    token_map, size = engram.build_compressed_token_map(v41.tokenizer)
    assert size == v41.config.engram_compressed_vocab_size
    prose = v41.tokenizer.encode(package_prose()[:4000], add_special_tokens=False)
    sequences = [prose[:70], prose[70:160], prose[160:200]]
    clean = helpers.sglang_hash_ids(v41.config, token_map, sequences, starts=[0, 30, 0])
    ids = clean.clone()
    ids[3, :, 1] = -1
    ids[7] = -1
    ids[-1, :, 0] = -1
    layers = {}
    for index, layer_id in enumerate(layout.layer_ids):
        codes, scales = v41.tables[layer_id]
        n, bounds = layout.num_embeddings[index], layout.column_bounds(index)
        owned = {}
        for tp_size in (1, 2):
            owned[tp_size] = []
            for rank in range(tp_size):
                embedding = helpers.make_sglang_embedding(n, layout.head_dim, bounds, tp_size, rank, layer_id)
                helpers.load_full_table(embedding, codes, scales)
                with torch.no_grad():
                    owned[tp_size].append(embedding._owned_rows(ids[:, index]))
                    if tp_size == 1:
                        forward = embedding(ids[:, index])
        helpers.sglang_parallel_reset()
        valid = clean[:, index].reshape(-1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "empty", _pinless_empty())
            stager = _stub_stager(staging)
            gathered = [stager._gather(table, valid) for table in (codes.view(torch.uint8), scales)]
            stager.pool.shutdown()
        assert torch.equal(gathered[0], codes.view(torch.uint8)[valid])
        assert _bits(owned[1][0]).any() and not owned[1][0][7].any()
        layers[layer_id] = types.SimpleNamespace(owned=owned, forward=forward, gathered=gathered, valid=valid)

    root = tmp_path_factory.mktemp("no_tables")
    others = [root / "before.safetensors", root / "after.safetensors"]
    save_file({"embed.weight": torch.arange(12.0).view(3, 4), "layers.0.attn.wq.weight": torch.ones(2, 2)}, others[0])
    save_file({"head.weight": torch.full((2, 3), 7.0)}, others[1])
    checkpoint = sorted(v41.checkpoint.glob("*.safetensors"))
    files = [str(path) for path in [others[0], *checkpoint, others[1]]]
    weights = {
        "single": list(weight_utils.safetensors_weights_iterator(files)),
        "threads": list(weight_utils.buffered_multi_thread_safetensors_weights_iterator(files, max_workers=2)),
    }
    assert any(name.endswith(TABLES) for name, _ in weights["single"])
    return types.SimpleNamespace(layout=layout, ids=ids, layers=layers, files=files, weights=weights)


def _embedding(reference, index: int, tp_size: int = 1, tp_rank: int = 0, layer_id=None, column_bounds=None):
    """``EngramEmbedding(num_embeddings, dim, layer_id, column_bounds)`` as SGLang's ``Engram.__init__``
    calls it for the layer ``index``, as TP rank ``tp_rank`` of ``tp_size`` (or another layer id or bounds)."""
    from sglang.srt.runtime_context import get_parallel

    engram, _ = _sglang_modules()
    layout = reference.layout
    get_parallel().override_permanently(tp_size=tp_size, tp_rank=tp_rank)
    layer_id = layout.layer_ids[index] if layer_id is None else layer_id
    column_bounds = layout.column_bounds(index) if column_bounds is None else column_bounds
    return engram.EngramEmbedding(layout.num_embeddings[index], layout.head_dim, layer_id, column_bounds=column_bounds)


def _check_rows(reference) -> None:
    """The plug-in's ``_owned_rows`` (every rank, TP 1 and 2) and ``forward`` (TP 1) equal SGLang's own bit
    for bit, for every layer."""
    for index, layer_id in enumerate(reference.layout.layer_ids):
        expected = reference.layers[layer_id]
        ids = reference.ids[:, index]  # a strided view, as SGLang's forward passes a layer's hash ids
        assert not ids.is_contiguous()
        for tp_size in (1, 2):
            for rank in range(tp_size):
                embedding = _embedding(reference, index, tp_size, rank)
                with torch.inference_mode():  # its rows are inference tensors: no_grad's, and stricter
                    owned = embedding._owned_rows(ids)
                    assert owned.dtype == torch.bfloat16
                    assert torch.equal(_bits(owned), _bits(expected.owned[tp_size][rank])), (layer_id, tp_size, rank)
                    if tp_size == 1:
                        assert torch.equal(_bits(embedding(ids)), _bits(expected.forward)), layer_id


def _failure(caplog) -> BaseException:
    """The error SGLang logged for the plug-in (it logs and goes on)."""
    failed = [record for record in caplog.records if record.getMessage() == FAILED]
    assert len(failed) == 1, caplog.text
    return failed[0].exc_info[1]


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


def test_without_settings_register_runs_and_patches_nothing(load_plugin, monkeypatch, caplog):
    plugin = _plugin()
    calls = []
    register = plugin.register
    monkeypatch.setattr(plugin, "register", lambda: calls.append(1) or register())
    from sglang.srt.model_loader import loader
    from sglang.srt.plugins.hook_registry import HookRegistry

    from engram_export.engines import settings

    before = _bindings()
    iterators = (loader.safetensors_weights_iterator, loader.buffered_multi_thread_safetensors_weights_iterator)
    with caplog.at_level(logging.INFO):
        load_plugin()
    assert calls == [1] and EXECUTED in caplog.text
    after = _bindings()
    assert all(after[target] is before[target] for target in before)
    assert (loader.safetensors_weights_iterator, loader.buffered_multi_thread_safetensors_weights_iterator) == iterators
    assert not HookRegistry._hooks and not settings._opened


@pytest.mark.parametrize("tp_size", [1, 2])
def test_engram_allocates_no_table(v41, reference, load_plugin, tp_size):
    """SGLang's own ``Engram.__init__`` builds the embedding: no parameters, placeholders over one row of
    memory, the rank's rows as ``shard_range`` gives them; the tables opened then, not at load."""
    from sglang.srt.runtime_context import get_parallel

    from engram_export.engines import settings

    engram, _ = _sglang_modules()
    load_plugin(rows=v41.folder)
    assert not settings._opened  # checked, not opened: a process that builds no model holds no table
    layout = reference.layout
    for index, layer_id in enumerate(layout.layer_ids):
        n, dim, bounds = layout.num_embeddings[index], layout.head_dim, layout.column_bounds(index)
        for rank in range(tp_size):
            get_parallel().override_permanently(tp_size=tp_size, tp_rank=rank)
            module = engram.Engram(v41.config, layer_id, layout)
            embed = module.embed
            assert isinstance(embed, engram.EngramEmbedding)
            assert list(embed.named_parameters()) == [] and list(embed.named_buffers()) == []
            assert not [name for name, _ in module.named_parameters() if name.startswith("embed.")]
            assert (embed.weight.shape, embed.weight.dtype) == ((n, dim), torch.float8_e4m3fn)
            assert (embed.scale.shape, embed.scale.dtype) == ((n, dim // 32), torch.float8_e8m0fnu)
            assert embed.weight.untyped_storage().nbytes() == dim
            assert embed.scale.untyped_storage().nbytes() == dim // 32
            start, end = engram.shard_range(n, bounds, rank, tp_size)
            assert (embed.row_start, embed.rows) == (start, end - start)
            assert embed.host_table is None and embed.peer is None and not embed.staged_by_scheduler
    assert len(settings._opened) == 1  # opened by the first EngramEmbedding, once for the process


@pytest.mark.parametrize("memory", ["mmap", "populate"])
def test_rows_equal_sglang_own_table(v41, reference, load_plugin, memory):
    load_plugin(rows=v41.folder, table_memory=memory)
    _check_rows(reference)


def test_stager_gathers_the_same_bytes(v41, reference, load_plugin, monkeypatch):
    """SGLang's ``EngramRowStager.from_model`` over served embeddings (scheduler staging on): its tables are
    the placeholders, and its hooked ``_gather`` returns the bytes SGLang's own gives from the real table
    (-1: zero bytes); a foreign table still goes to SGLang's own ``_gather``."""
    from sglang.srt.runtime_context import get_parallel

    engram, staging = _sglang_modules()
    load_plugin(rows=v41.folder)
    layout = reference.layout
    get_parallel().override_permanently(tp_size=1, tp_rank=0, attn_cp_size=1)
    model = torch.nn.ModuleList(engram.Engram(v41.config, layer_id, layout) for layer_id in layout.layer_ids)
    assert staging.EngramRowStager.from_model(model, None, torch.device("cpu")) is None  # staging is off
    assert not any(module.embed.shared_host_table_without_ats for module in model)
    monkeypatch.setenv("SGLANG_OPT_DSV41_ENGRAM_HOST_STAGING", "1")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    stager = staging.EngramRowStager.from_model(model, None, torch.device("cpu"))
    assert stager is not None and all(module.embed.staged_by_scheduler for module in model)
    for (weight, scale), layer_id in zip(stager.tables, layout.layer_ids, strict=True):
        expected = reference.layers[layer_id]
        ids = expected.valid
        codes, scales = stager._gather(weight, ids), stager._gather(scale, ids)
        assert (codes.dtype, scales.dtype) == (torch.uint8, torch.uint8)
        assert torch.equal(codes, expected.gathered[0]) and torch.equal(scales, expected.gathered[1])
        dead = torch.tensor([ids[0], -1, ids[1]])
        assert torch.equal(stager._gather(weight, dead)[1], torch.zeros(layout.head_dim, dtype=torch.uint8))
    foreign = torch.randint(0, 256, (layout.num_embeddings[0], 8), dtype=torch.uint8)
    monkeypatch.setattr(torch, "empty", _pinless_empty())
    ids = reference.layers[layout.layer_ids[0]].valid
    assert torch.equal(stager._gather(foreign, ids), foreign[ids])
    stager.pool.shutdown()


@pytest.fixture(scope="module")
def edge_scales(v41, reference, tmp_path_factory):
    """``v41``'s checkpoint with scale bytes 0 and 255 in its tables (one row in 7 each; a trained table holds
    neither: the E8M0 spec, and SGLang, decode them as 2^-127 and NaN), exported; and SGLang's own rows of
    ``reference.ids`` from it (TP 1, its ``forward``)."""
    import json
    import shutil

    import numpy as np
    from safetensors import safe_open

    from engram_export.folders import export_checkpoint

    root = tmp_path_factory.mktemp("edge_scales")
    checkpoint = Path(shutil.copytree(v41.checkpoint, root / "ckpt"))
    for path in checkpoint.glob("*.safetensors"):
        with open(path, "r+b") as file:
            size = int.from_bytes(file.read(8), "little")
            for name, tensor in json.loads(file.read(size)).items():
                if name.endswith(".engram.embed.scale"):
                    start, end = (8 + size + offset for offset in tensor["data_offsets"])
                    file.seek(start)
                    scales = np.frombuffer(file.read(end - start), np.uint8).reshape(tensor["shape"]).copy()
                    scales[0::7, 0], scales[1::7, -1] = 0, 255
                    file.seek(start)
                    file.write(scales.tobytes())
    folder = export_checkpoint(checkpoint, root / "v41")
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    layout, rows = reference.layout, {}
    for index, layer_id in enumerate(layout.layer_ids):
        name = f"layers.{layer_id}.engram.embed.weight"
        with safe_open(checkpoint / weight_map[name], "pt") as shard:
            codes, scales = shard.get_tensor(name), shard.get_tensor(name.replace("weight", "scale"))
        embedding = helpers.make_sglang_embedding(
            layout.num_embeddings[index], layout.head_dim, layout.column_bounds(index), layer_id=layer_id
        )
        helpers.load_full_table(embedding, codes, scales.view(torch.uint8))
        with torch.no_grad():
            rows[layer_id] = embedding(reference.ids[:, index])
        helpers.sglang_parallel_reset()
    return types.SimpleNamespace(folder=folder, rows=rows)


def test_scale_bytes_0_and_255_decode_as_sglang(reference, edge_scales, load_plugin):
    """Every row SGLang's ``forward`` gives, 2^-127 scales included, bit for bit; NaN where it gives NaN. NaN's
    own bits are its float-to-bf16 conversion's (torch's vectorized CPU one writes 0xFFFF, the row reader the
    canonical 0x7FC0; SGLang's CUDA kernel its own): the same value, not the same bits."""
    load_plugin(rows=edge_scales.folder)
    for index, layer_id in enumerate(reference.layout.layer_ids):
        expected = edge_scales.rows[layer_id]
        assert expected.isnan().any() and (expected.float().abs() < 2.0**-100).any()  # the rows hold both
        with torch.inference_mode():
            rows = _embedding(reference, index)(reference.ids[:, index])
        nan = expected.isnan()  # NaN where SGLang's is, each other value's bits SGLang's own
        assert torch.equal(rows.isnan(), nan) and torch.equal(_bits(rows)[~nan], _bits(expected)[~nan]), layer_id


@pytest.fixture(scope="module")
def tiered_folder(v41, tmp_path_factory):
    """The folder calibrated on prose: 30% of the rows hot, the rest read from the files."""
    from engram_export.folders.calibration import calibrate

    root = tmp_path_factory.mktemp("tiered")
    text = root / "prose.txt"
    text.write_text(package_prose())
    calibrate(v41.folder, root / "v41-tiered", [text], "30%")
    return root / "v41-tiered"


def test_tiered_folder_with_misses(reference, tiered_folder, load_plugin):
    from engram_export.engines import settings

    load_plugin(rows=tiered_folder, table_memory="tiered", cache_budget="16KiB")
    _check_rows(reference)
    (rows,) = settings._opened.values()
    for layer_id in reference.layout.layer_ids:
        stats = rows[layer_id].stats()
        assert stats["rows"] > 0 and stats["hot_hits"] > 0 and stats["rows_read"] > 0, stats


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of one node on 127.0.0.1 with token authentication (``tests/test_sharding.py``)."""
    import secrets

    environment = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment.items():
            patch.setenv(key, value)
        import ray
        from ray.cluster_utils import Cluster

        from engram_export.sharding.names import NAMESPACE

        nodes = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "object_store_memory": 128 << 20, "include_dashboard": False},
        )
        ray.init(address=nodes.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        try:
            nodes.wait_for_nodes()
            address = ray.get_runtime_context().gcs_address
            assert address.startswith("127.0.0.1:"), address
            patch.setenv("RAY_ADDRESS", address)
            yield ray
        finally:
            ray.shutdown()
            nodes.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_served_tables(v41, reference, ray_cluster, load_plugin):
    from engram_export.engines import settings
    from engram_export.sharding.cluster import serve_tables, stop_tables

    serve_tables(v41.folder, "sglang-v41", shards=2)
    try:
        load_plugin(rows=v41.folder, tables="ray://sglang-v41")
        _check_rows(reference)
        (rows,) = settings._opened.values()
        assert all(rows[layer_id].stats()["remote_calls"] > 0 for layer_id in reference.layout.layer_ids)
    finally:
        stop_tables("sglang-v41")


def test_checkpoint_tables_are_skipped_before_they_are_read(v41, reference, load_plugin, monkeypatch):
    """SGLang's loader's iterators (its default, multi-threaded, and the single one), hooked: every other
    tensor as unhooked, in the same order; the tables never read (``get_tensor``)."""
    import safetensors
    from sglang.srt.model_loader import loader

    load_plugin(rows=v41.folder)
    read: list[str] = []
    monkeypatch.setattr(safetensors, "safe_open", helpers.recording_safe_open(safetensors.safe_open, read))
    hooked = {
        "single": list(loader.safetensors_weights_iterator(reference.files)),
        "threads": list(loader.buffered_multi_thread_safetensors_weights_iterator(reference.files, max_workers=2)),
    }
    for kind, unhooked in reference.weights.items():
        kept = [(name, tensor) for name, tensor in unhooked if not name.endswith(TABLES)]
        assert [name for name, _ in hooked[kind]] == [name for name, _ in kept], kind
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(hooked[kind], kept, strict=True)), kind
    assert read and not [name for name in read if name.endswith(TABLES)]


def test_missing_folder_is_refused_at_engram_embedding(reference, load_plugin, tmp_path, caplog):
    missing = tmp_path / "missing"
    load_plugin(rows=missing)
    assert str(missing) in _one_line(_failure(caplog))
    with pytest.raises(EngramError, match="missing") as refused:
        _embedding(reference, 0)
    assert str(missing) in _one_line(refused.value)


@pytest.fixture(scope="module")
def other_folders(tmp_path_factory):
    """Folders of other models: the demo family's tiny preset (its layer 1, as V4.1's first), and V4.1 with
    another engram_vocab_size."""
    from engram_export import load_config
    from engram_export.core import progress
    from engram_export.folders import export_checkpoint, export_folder
    from engram_export.folders.synthetic import write_v41_checkpoint
    from tests.v41_spec import TINY

    progress.quiet()
    root = tmp_path_factory.mktemp("other_models")
    sizes = helpers.engram_config(layer_ids=[1], max_ngram_size=3, n_heads=2, head_dim=64, vocab_size=1499)
    spec = {**TINY, "engram_layer_ids": [1], "engram_vocab_size": 1499}
    checkpoint = write_v41_checkpoint(
        root / "ckpt", {**spec, "engram_num_embeddings": sizes.engram_num_embeddings}, tokenizer=True
    )
    return {
        "demo": export_folder(load_config("tiny").replace(layer_ids=[1]), root / "demo", seed=0, optimize=False),
        "v41 vocab 1499": export_checkpoint(checkpoint, root / "v41-1499"),
    }


@pytest.mark.parametrize("other", ["demo", "v41 vocab 1499"])
def test_folder_of_another_model_is_refused_at_engram_embedding(reference, other_folders, load_plugin, other):
    load_plugin(rows=other_folders[other])
    with pytest.raises(EngramError, match="another model") as refused:
        _embedding(reference, 0)
    _one_line(refused.value)


def test_other_head_sizes_are_refused(v41, reference, load_plugin):
    """A model whose layer has as many rows but hashes them into other head sizes (its primes in another
    order): refused, not served."""
    load_plugin(rows=v41.folder)
    bounds = reference.layout.column_bounds(0)
    first, second = bounds[1] - bounds[0], bounds[2] - bounds[1]
    swapped = (bounds[0], bounds[0] + second, *bounds[2:])
    assert first != second and swapped[-1] == bounds[-1]
    with pytest.raises(EngramError, match="other head sizes") as refused:
        _embedding(reference, 0, column_bounds=swapped)
    _one_line(refused.value)


def test_layer_the_folder_lacks_is_refused(v41, reference, load_plugin):
    load_plugin(rows=v41.folder)
    with pytest.raises(EngramError, match="Engram layer 2") as refused:
        _embedding(reference, 0, layer_id=2)
    assert "[1, 3]" in _one_line(refused.value)


def test_changed_sglang_signature_is_refused_naming_the_method(v41, reference, load_plugin, monkeypatch, caplog):
    engram, _ = _sglang_modules()

    def owned_rows(self, indices, out=None):  # another release's parameters
        raise AssertionError("never called")

    monkeypatch.setattr(engram.EngramEmbedding, "_owned_rows", owned_rows)
    load_plugin(rows=v41.folder)
    assert "_owned_rows" in _one_line(_failure(caplog))
    with pytest.raises(EngramError, match="_owned_rows") as refused:
        _embedding(reference, 0)
    _one_line(refused.value)
    assert engram.EngramEmbedding._owned_rows is owned_rows  # nothing else was hooked
