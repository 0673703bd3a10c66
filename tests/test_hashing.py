"""The hash is bit-exact with an independent implementation of the spec (sections 2-4).

The independent version below uses Python integers (explicit 64-bit wrap, trial-division primes,
a per-token loop) rather than numpy arrays, so a shared mistake is unlikely.
"""

from __future__ import annotations

import numpy as np
import pytest

from engram_export.core.errors import EngramError
from engram_export.models.config import load_config
from engram_export.models.hashing import EngramHashing, hash_rows, is_prime

MASK64 = (1 << 64) - 1


def spec_is_prime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def spec_multipliers(config, compressed_vocab: int, layer_id: int) -> list[int]:
    half = max(1, ((2**63 - 1) // compressed_vocab) // 2)
    rng = np.random.default_rng(config.seed + 10007 * layer_id)
    return [int(r) * 2 + 1 for r in rng.integers(0, half, size=config.max_ngram_size, dtype=np.int64)]


def spec_primes(config) -> dict[int, list[int]]:
    seen, out = set(), {}
    for layer_id in config.layer_ids:
        out[layer_id] = []
        for order in range(2, config.max_ngram_size + 1):
            start = config.engram_vocab_size[order - 2] - 1
            for _ in range(config.n_head_per_ngram):
                candidate = start + 1
                while not spec_is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                out[layer_id].append(candidate)
                start = candidate
    return out


def to_signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def spec_rows(ids, lut, pad, multipliers, primes, heads_per_order) -> np.ndarray:
    compressed = [[int(lut[i]) if i >= 0 else int(i) for i in row] for row in ids.tolist()]
    offsets = [sum(primes[:h]) for h in range(len(primes))]
    out = np.zeros((len(compressed), len(compressed[0]), len(primes)), dtype=np.int64)
    for b, row in enumerate(compressed):
        for t in range(len(row)):
            tokens = [row[t - k] if t - k >= 0 else pad for k in range(len(multipliers))]
            head = 0
            for order in range(2, len(multipliers) + 1):
                mix = 0
                for k in range(order):
                    mix ^= to_signed(tokens[k] * multipliers[k])  # int64 product, wrapped
                mix = to_signed(mix)
                for _ in range(heads_per_order):
                    out[b, t, head] = mix % primes[head] + offsets[head]  # Python % is floor mod
                    head += 1
    return out


CONFIGS = {
    "tiny": load_config("tiny"),
    "demo-dims": load_config("deepseek-demo"),
    "four-gram": load_config("tiny").replace(
        max_ngram_size=4,
        engram_vocab_size=(101, 211, 307),
        n_head_per_ngram=3,
        n_embed_per_ngram=12,
        layer_ids=(0, 2, 7),
        seed=5,
        pad_id=0,
        vocab_size=300,
    ),
    "one-head": load_config("tiny").replace(
        n_head_per_ngram=1, n_embed_per_ngram=8, layer_ids=(4,), vocab_size=7, pad_id=6
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_constants_and_rows_match_the_spec(name):
    config = CONFIGS[name]
    hashing = EngramHashing(config)
    primes = spec_primes(config) if name != "demo-dims" else None
    rng = np.random.default_rng(0)
    for layer_id in config.layer_ids:
        multipliers = spec_multipliers(config, config.vocab_size, layer_id)
        assert hashing.multipliers(layer_id) == multipliers
        assert all(m % 2 == 1 for m in multipliers)
        if primes is not None:
            assert hashing.primes(layer_id) == primes[layer_id]
        layer_primes = hashing.primes(layer_id)
        assert all(spec_is_prime(p) for p in layer_primes[:4])
        ids = rng.integers(0, config.vocab_size, size=(3, 11))
        ids[1, 4] = -1
        ids[2, 0] = -100
        expected = spec_rows(ids, hashing.lut, hashing.pad_id, multipliers, layer_primes, config.n_head_per_ngram)
        np.testing.assert_array_equal(hashing.rows(ids, layer_id), expected)


def test_demo_primes_are_unique_across_layers_and_follow_order():
    hashing = EngramHashing(CONFIGS["demo-dims"])
    first, second = hashing.primes(1), hashing.primes(15)
    assert len(first) == len(second) == 16
    assert first[0] == 646403  # next prime after 646400 - 1 that is not yet taken
    assert len(set(first) | set(second)) == 32
    assert first[:8] == sorted(first[:8]) and min(second) > max(first)
    assert hashing.table_rows(1) == sum(first) == 10_344_164


def test_later_layer_primes_depend_on_earlier_layers():
    config = CONFIGS["tiny"]
    alone = EngramHashing(config.replace(layer_ids=(3,)))
    assert EngramHashing(config).primes(3) != alone.primes(3)


def test_wrapping_products_for_negative_ids_match_python_integers():
    config = CONFIGS["one-head"]  # vocab 7: multipliers near int64_max / 14, products of negatives wrap
    hashing = EngramHashing(config)
    ids = np.array([[-(2**31), -1, 6, -123456789, 0, 5]], dtype=np.int64)
    multipliers = hashing.multipliers(4)
    assert max(multipliers) > 2**59
    expected = spec_rows(ids, hashing.lut, hashing.pad_id, multipliers, hashing.primes(4), 1)
    np.testing.assert_array_equal(
        hash_rows(ids, hashing.lut, multipliers, hashing.primes(4), hashing.pad_id, 1), expected
    )


def test_is_prime_agrees_with_trial_division():
    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if spec_is_prime(n)]
    assert is_prime(2_147_483_647) and not is_prime(2_147_483_649)


def test_unknown_layer_is_refused():
    with pytest.raises(EngramError, match="layer 2 is not an Engram layer"):
        EngramHashing(CONFIGS["tiny"]).multipliers(2)
