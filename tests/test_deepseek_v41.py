"""DeepSeek-V4.1's Engram in PyTorch against the spec (section 8), computed independently here.

The hash is checked bit for bit against a per-position loop written straight from the spec; the layer
against float64 numpy (Δ = out - h: max |Δ - Δref| / max |Δref| <= 1e-4, the f32 criterion of every
path); masked tokens give out == h exactly. The released config's multipliers and prime sums are the
spec's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_export.core.errors import EngramError
from engram_export.models.deepseek_v41 import V41EngramLayer
from engram_export.models.deepseek_v41_config import V41Config, V41Hashing, e4m3_values, e8m0_values, hash_rows_v41
from tests.v41_spec import RELEASED, TINY, random_tensors, spec_output, spec_rows


def test_released_multipliers_and_primes():
    hashing = V41Hashing(V41Config.from_hf(RELEASED))
    assert hashing.multipliers(1) == [76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert sum(hashing.primes(1)) == 384006168 and sum(hashing.primes(14)) == 384016682
    assert len(hashing.primes(1)) == 24 and min(hashing.primes(1)) > 16_000_000
    assert not set(hashing.primes(1)) & set(hashing.primes(14))


@pytest.mark.parametrize("config", [RELEASED, TINY], ids=["released", "tiny"])
def test_hash_matches_the_spec_loop(config):
    config = V41Config.from_hf(config)
    hashing = V41Hashing(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.compressed_vocab_size, (3, 11))
    ids[0, :4] = config.compressed_vocab_size - 1  # the largest products
    mask = rng.random((3, 11)) > 0.25
    for layer in config.layer_ids:
        got = hash_rows_v41(
            ids, mask, hashing.multipliers(layer), hashing.primes(layer), hashing.pad_id, config.n_head_per_ngram
        )
        expected = spec_rows(
            ids, mask, hashing.multipliers(layer), hashing.primes(layer), hashing.pad_id, config.n_head_per_ngram
        )
        np.testing.assert_array_equal(got, expected)
        assert got.max() < config.table_rows(layer)


def test_fp8_decode_tables():
    assert e4m3_values()[0x38] == 1.0 and e4m3_values()[0x7E] == 448.0 and np.isnan(e4m3_values()[0x7F])
    assert e4m3_values()[0xB8] == -1.0 and e4m3_values()[0x01] == 2.0**-9
    np.testing.assert_array_equal(e8m0_values()[:255], [2.0 ** (b - 127) for b in range(255)])
    assert np.isnan(e8m0_values()[255])


@pytest.mark.parametrize("batch,tokens", [(50, 14), (1, 1), (3, 17)])
def test_layer_matches_the_spec(batch, tokens):
    config = V41Config.from_hf(TINY)
    hashing = V41Hashing(config)
    rng = np.random.default_rng(batch * 100 + tokens)
    ids = rng.integers(0, config.compressed_vocab_size, (batch, tokens))
    hidden = rng.normal(size=(batch, tokens, config.hc_mult, config.hidden_size)).astype(np.float32)
    mask = rng.random((batch, tokens)) > 0.2
    for layer_id in config.layer_ids:
        tensors = random_tensors(config, layer_id, seed=layer_id)
        layer = V41EngramLayer(config, layer_id, tensors, hashing)
        with torch.inference_mode():
            out = layer(torch.from_numpy(ids), torch.from_numpy(hidden), torch.from_numpy(mask)).numpy()
        reference = spec_output(config, layer_id, tensors, hashing, ids, hidden, mask)
        delta, delta_ref = out - hidden, reference - hidden
        assert np.abs(delta - delta_ref).max() <= 1e-4 * np.abs(delta_ref).max()
        np.testing.assert_array_equal(out[~mask], hidden[~mask])  # image tokens: exactly h


@pytest.mark.parametrize(
    "change,message",
    [
        ({"engram_num_embeddings": [4039, 4124]}, "head primes sum to 4038"),
        ({"model_type": "deepseek_v3"}, "model_type must be 'deepseek_v41'"),
        ({"engram_head_dim": 48}, "must be a multiple of 32"),
        ({"engram_n_heads": True}, "engram_n_heads must be an integer"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be in"),
        ({"engram_num_embeddings": [4038]}, "needs one entry per layer"),
    ],
)
def test_config_refusals(change, message):
    with pytest.raises(EngramError, match=message):
        V41Hashing(V41Config.from_hf({**TINY, **change})).primes(1)


def test_missing_field_is_named():
    data = dict(TINY)
    del data["engram_head_dim"]
    with pytest.raises(EngramError, match="missing field.*engram_head_dim"):
        V41Config.from_hf(data)


def test_tokenizer_size_must_match(tokenizer_json):
    config = V41Config.from_hf({**TINY, "tokenizer": str(tokenizer_json)})
    with pytest.raises(EngramError, match="engram_compressed_vocab_size says 3000"):
        _ = V41Hashing(config).lut


@pytest.mark.parametrize("shape", [(64, 96), (70, 45)])
def test_dequantize_blocks_scales_each_32x32_block(shape):
    """Each FP8 value times the E8M0 scale of its 32x32 block (blocks cut short at the edges)."""
    from engram_export.models.deepseek_v41 import dequantize_blocks

    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.integers(0, 0x7F, shape, dtype=np.uint8)).view(torch.float8_e4m3fn)
    blocks = (-(-shape[0] // 32), -(-shape[1] // 32))
    scale = torch.from_numpy(rng.integers(110, 140, blocks, dtype=np.uint8)).view(torch.float8_e8m0fnu)
    expected = np.empty(shape, np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            expected[i, j] = float(weight[i, j].float()) * 2.0 ** (int(scale[i // 32, j // 32].view(torch.uint8)) - 127)
    np.testing.assert_array_equal(dequantize_blocks(weight, scale).numpy(), expected)


def test_the_fp8_decode_tables_are_pytorchs_to_the_bit():
    """e4m3_values and e8m0_values are numpy (a runtime loads no PyTorch): every byte's float32 as
    PyTorch's float8 types widen it (E4M3's bits, NaN payloads included; E8M0's one NaN is a NaN)."""
    codes = torch.arange(256, dtype=torch.uint8)
    e4m3 = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(e4m3_values().view(np.uint32), e4m3.view(np.uint32))
    np.testing.assert_array_equal(e8m0_values(), codes.view(torch.float8_e8m0fnu).float().numpy())
