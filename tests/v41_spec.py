"""DeepSeek-V4.1 configs and section 8 of the spec computed independently (numpy, float64): shared by
the V4.1 tests."""

from __future__ import annotations

import math

import numpy as np
import torch

from engram_export.models.deepseek_v41_config import BLOCK, V41Config, e4m3_values, e8m0_values

RELEASED = {
    "model_type": "deepseek_v41",
    "engram_layer_ids": [1, 14],
    "engram_num_embeddings": [384006168, 384016682],
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 16000000,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99092,
    "hc_mult": 4,
    "hidden_size": 5120,
    "rms_norm_eps": 1e-20,
    "vocab_size": 129280,
}
TINY = {
    **RELEASED,
    "engram_layer_ids": [1, 3],
    "engram_num_embeddings": [4038, 4124],
    "engram_max_ngram_size": 3,
    "engram_vocab_size": 997,
    "engram_n_heads": 2,
    "engram_head_dim": 64,
    "engram_compressed_vocab_size": 3000,
    "hidden_size": 48,
    "vocab_size": 5000,
}


def spec_rows(ids, mask, multipliers, primes, pad, n_heads):
    """Section 8's hash, one position at a time."""
    batch, length = ids.shape
    out = np.zeros((batch, length, len(primes)), np.int64)
    offsets = [sum(primes[:c]) for c in range(len(primes))]
    for b in range(batch):
        for t in range(length):
            blocked, tokens = False, []
            for s in range(len(multipliers)):
                blocked = blocked or t - s < 0 or not mask[b, t - s]
                tokens.append(pad if blocked else int(ids[b, t - s]))
            rolling = np.int64(tokens[0]) * np.int64(multipliers[0])
            for i in range(1, len(multipliers)):
                rolling ^= np.int64(tokens[i]) * np.int64(multipliers[i])
                for head in range(n_heads):
                    column = (i - 1) * n_heads + head
                    out[b, t, column] = int(rolling) % primes[column] + offsets[column]
    return out


def random_tensors(config: V41Config, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint-like tensors: FP8 bytes without NaN codes, E8M0 scales near 2**0."""
    rng = np.random.default_rng(seed)

    def fp8(shape):
        values = rng.integers(0, 0x7E, shape, dtype=np.uint8) | (rng.integers(0, 2, shape, dtype=np.uint8) << 7)
        return torch.from_numpy(values).view(torch.float8_e4m3fn)

    def e8m0(shape, low, high):
        return torch.from_numpy(rng.integers(low, high, shape, dtype=np.uint8)).view(torch.float8_e8m0fnu)

    out, width = config.projection_width, config.engram_hidden_size
    rows = config.table_rows(layer)
    return {
        "embed.weight": fp8((rows, config.head_dim)),
        "embed.scale": e8m0((rows, config.head_dim // BLOCK), 120, 128),
        "wkv.weight": fp8((out, width)),
        "wkv.scale": e8m0((math.ceil(out / BLOCK), math.ceil(width / BLOCK)), 112, 118),
        "q_weight": torch.from_numpy(rng.normal(1, 0.2, (config.hc_mult, config.hidden_size))).bfloat16(),
        "k_weight": torch.from_numpy(rng.normal(1, 0.2, (config.hc_mult, config.hidden_size))).bfloat16(),
    }


def spec_output(config, layer, tensors, hashing, ids, hidden, mask):
    """Section 8 in float64 numpy."""
    e4m3, e8m0 = e4m3_values().astype(np.float64), e8m0_values().astype(np.float64)
    raw = {
        k: v.view(torch.uint8).numpy() if v.dtype != torch.bfloat16 else v.float().numpy().astype(np.float64)
        for k, v in tensors.items()
    }
    rows = spec_rows(
        hashing.lut[ids],
        mask,
        hashing.multipliers(layer),
        hashing.primes(layer),
        hashing.pad_id,
        config.n_head_per_ngram,
    )
    values = e4m3[raw["embed.weight"][rows]] * np.repeat(e8m0[raw["embed.scale"][rows]], BLOCK, axis=-1)
    e = values.reshape(*ids.shape, -1)
    scale = np.repeat(np.repeat(e8m0[raw["wkv.scale"]], BLOCK, 0), BLOCK, 1)
    weight = e4m3[raw["wkv.weight"]] * scale[: raw["wkv.weight"].shape[0], : raw["wkv.weight"].shape[1]]
    kv = e @ weight.T
    hc, d = config.hc_mult, config.hidden_size
    key, value = kv[..., : hc * d].reshape(*ids.shape, hc, d), kv[..., hc * d :]
    h = hidden.astype(np.float64)
    eps = config.rms_norm_eps
    rstd = 1 / np.sqrt((h**2).mean(-1) + eps) / np.sqrt((key**2).mean(-1) + eps)
    dot = (h * raw["q_weight"] * raw["k_weight"] * key).sum(-1) * rstd / np.sqrt(d)
    gate = 1 / (1 + np.exp(-np.sign(dot) * np.sqrt(np.maximum(np.abs(dot), 1e-6))))
    gate = np.where(mask[..., None], gate, 0.0)
    return h + gate[..., None] * value[..., None, :]
