"""``.venv-engines`` runs the released engines' own Engram code on CPU: vLLM 0.33.0's lookup kernel and hash
kernel (Triton, interpreted) and SGLang 0.5.23's torch paths, each checked against torch's own fp8/e8m0
conversions and against each other."""

import importlib.metadata

import pytest
import torch

from tests.engines import helpers

WORDS = ["<pad>", "The", " the", "THE", " The", "cat", " cat", "Cat", " ", "\n", "é", "e", "dog", " dog", "ﬁ", "fi"]


def test_the_environment_is_the_released_engines_beside_torch_cpu():
    assert importlib.metadata.version("vllm") == "0.33.0"
    assert importlib.metadata.version("sglang") == "0.5.23"
    assert torch.__version__ == "2.13.0+cpu"
    assert not torch.cuda.is_available()
    import torchvision

    assert torchvision.__version__ == "0.0.0+stub"  # never the CUDA wheel


@pytest.fixture(scope="module")
def table():
    """A layer's full table (vocab 100, 3-grams, 2 heads: 4 hash columns of prime sizes), as a checkpoint
    holds it, and ids [tokens, columns] into it: one per column's bucket, then -1 and past-the-end ids."""
    config = helpers.engram_config(vocab_size=100, max_ngram_size=3, n_heads=2, head_dim=64)
    sizes = helpers.head_sizes(config)
    rows = sum(sizes)
    codes, scales = helpers.random_table(rows, 64, seed=0)
    generator = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    ids = torch.stack([torch.randint(0, size, (6,), generator=generator) for size in sizes], 1) + offsets
    ids[1, 2] = -1  # vLLM's DEAD_ID (padding, DP dummies)
    ids[2, 0] = rows + 7
    ids[5] = -1
    return config, sizes, codes, scales, ids


@pytest.mark.parametrize("tp_size", [1, 2])
def test_vllm_lookup_is_torch_dequantization_and_packed_bytes(vllm_engram, make_vllm_embedding, table, tp_size):
    """vLLM's ``ParallelEngramEmbedding.lookup``: bf16 rows ``bf16(fp32(e4m3) * 2**(scale - 127))``, packed
    rows ``[64 code bytes | 2 scale bytes]`` per head; -1 and out-of-range ids give zeros. Each TP rank
    writes its own head columns."""
    config, sizes, codes, scales, ids = table
    bf16_parts, packed_parts = [], []
    for rank in range(tp_size):
        embedding = make_vllm_embedding(sum(sizes), 64, sizes, tp_size=tp_size, tp_rank=rank)
        helpers.load_full_table(embedding, codes, scales)
        bf16 = torch.full((len(ids), embedding.part_n_hash_cols, 64), 7.0, dtype=torch.bfloat16)
        embedding.lookup(ids.to(torch.int32), bf16)
        packed = torch.full((len(ids), embedding.part_n_hash_cols, 64 + 2), 0xAB, dtype=torch.uint8)
        embedding.lookup(ids, packed, background=True)
        bf16_parts.append(bf16)
        packed_parts.append(packed)
    bf16, packed = torch.cat(bf16_parts, 1), torch.cat(packed_parts, 1)
    assert torch.equal(bf16, helpers.dequantized_rows(codes, scales, ids))
    assert torch.equal(packed, helpers.packed_rows(codes, scales, ids))
    assert not bf16[5].any() and not packed[5].any()  # a token of -1 ids only
    assert bf16[0].abs().sum() > 0


@pytest.mark.parametrize("tp_size", [1, 2])
def test_sglang_owned_rows_are_the_same_dequantized_rows(sglang_engram, make_sglang_embedding, table, tp_size):
    """SGLang's ``EngramEmbedding._owned_rows`` (torch path on CPU): the rank's rows dequantized as vLLM's,
    zero rows for the rest; the TP ranks' rows add up to the full lookup (what its all-reduce does)."""
    config, sizes, codes, scales, ids = table
    bounds = sglang_engram.EngramLayout.from_config(config).column_bounds(0)
    expected = helpers.dequantized_rows(codes, scales, ids)
    total = torch.zeros(expected.shape)
    for rank in range(tp_size):
        embedding = make_sglang_embedding(sum(sizes), 64, bounds, tp_size=tp_size, tp_rank=rank, layer_id=2)
        helpers.load_full_table(embedding, codes, scales)
        with torch.no_grad():
            owned = embedding._owned_rows(ids)
            if tp_size == 1:
                assert torch.equal(embedding(ids), expected)
        assert owned.dtype == torch.bfloat16 and owned.shape == expected.shape
        total += owned.float()
    assert torch.equal(total.to(torch.bfloat16), expected)
    assert not total[5].any()


def test_vllm_hash_kernel_equals_sglang_torch_hash(vllm_engram, sglang_engram, engine_hash_ids):
    """vLLM's Triton ``_hash_ids_kernel`` (interpreted) and SGLang's ``compute_engram_hash_ids`` give the
    same row ids on one batch: a fresh prompt, and a chunk that continues a sequence (its earlier tokens as
    the lookback); both engines compress the tokenizer alike and draw the same primes and multipliers."""
    token_map, size = helpers.token_map(helpers.tiny_tokenizer(WORDS))
    assert size < len(WORDS) and token_map[1] == token_map[2] == token_map[3]  # "The", " the", "THE"
    config = helpers.engram_config(vocab_size=1000, max_ngram_size=4, n_heads=3, compressed_vocab_size=size)
    assert vllm_engram.EngramLayout(config).primes == sglang_engram.EngramLayout.from_config(config).primes
    generator = torch.Generator().manual_seed(2)
    prompt, continued = (torch.randint(0, len(WORDS), (n,), generator=generator).tolist() for n in (5, 9))
    from_vllm, from_sglang = engine_hash_ids(config, token_map, [prompt, continued], starts=[0, 6])
    assert from_vllm.dtype == torch.int32 and from_vllm.shape == (5 + 3, 2, 3 * 3)
    assert torch.equal(from_vllm.long(), from_sglang)
    # each column's ids lie in its own prime-sized bucket of the layer's table
    for layer in range(2):
        bounds = sglang_engram.EngramLayout.from_config(config).column_bounds(layer)
        low, high = torch.tensor(bounds[:-1]), torch.tensor(bounds[1:])
        assert ((from_sglang[:, layer] >= low) & (from_sglang[:, layer] < high)).all()
