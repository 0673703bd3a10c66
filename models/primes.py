"""Primes and constants both families' hashes draw on (no config here: every family's hash imports it)."""

from __future__ import annotations

import numpy as np

__all__ = ["is_prime", "INT64_MAX", "LAYER_SEED_STRIDE"]

INT64_MAX = np.iinfo(np.int64).max
LAYER_SEED_STRIDE = 10007  # the demo's PRIME_1


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (so for any table size)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_prime(start: int, seen: set[int]) -> int:
    candidate = start + 1
    while not is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate
