"""Overflow-free integer hashing shared by NumPy, eager PyTorch, TorchScript and ONNX.

Every hash in the model is universal hashing modulo the Mersenne prime P = 2**31 - 1 with operands
below 2**31, so no intermediate exceeds 2**63 and int64 arithmetic is exact everywhere. The
functions below use only ``+ * // % &`` on non-negative integers: called with NumPy arrays they run
in NumPy, called with tensors they run in PyTorch, and ``torch.jit.script`` compiles them (they are
reached from the embedding modules' ``forward``) into graphs that export to ONNX as
Add/Mul/Div/Mod/BitwiseAnd. ``tests/models/test_inthash.py`` pins golden values for all of them.

A 62-bit token key is split as ``key = hi * 2**31 + lo`` with both halves below 2**31, and hashed
as ``((a * hi) % P + b * lo + c) % P``.
"""

from __future__ import annotations

import numpy as np

PRIME = 2**31 - 1
HALF = 2**31  # keys split into two 31-bit halves
LOW_MASK = HALF - 1
CHUNK_BITS = 30  # bits taken from one hash value when concatenating hashes


def key_halves(keys):  # type: ignore[no-untyped-def]
    """62-bit keys -> (hi, lo), each below 2**31."""
    # Literals, not the module constants: TorchScript cannot read Python globals.
    return keys // 2147483648, keys & 2147483647


def hash_halves(hi, lo, a: int, b: int, c: int):  # type: ignore[no-untyped-def]
    """Universal hash of a split key into [0, P). Requires a, b, c < P and hi, lo < 2**31."""
    return ((hi * a) % 2147483647 + lo * b + c) % 2147483647


def hash_key(keys, a: int, b: int, c: int):  # type: ignore[no-untyped-def]
    hi, lo = key_halves(keys)
    return hash_halves(hi, lo, a, b, c)


def draw_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rows of (a, b, c) hash parameters: a, b in [1, P), c in [0, P). int64 (n, 3)."""
    ab = rng.integers(1, PRIME, size=(n, 2), dtype=np.int64)
    c = rng.integers(0, PRIME, size=(n, 1), dtype=np.int64)
    return np.concatenate([ab, c], axis=1)


def fallback_signatures(keys, params: list[list[int]], total_bits: int):  # type: ignore[no-untyped-def]
    """Signature of tokens without a stored one: concatenated 30-bit chunks of universal hashes.

    ``params`` holds one (a, b, c) per 30-bit chunk; the result has ``total_bits`` bits (<= 62),
    so its b-bit fields are (nearly) independent uniform values, like the minhashes of a random
    singleton set: such tokens behave like the hashing trick.
    """
    hi, lo = key_halves(keys)
    sig = keys * 0
    shift = 1
    remaining = total_bits
    for p in params:
        bits = min(30, remaining)  # CHUNK_BITS
        chunk = hash_halves(hi, lo, p[0], p[1], p[2]) & ((1 << bits) - 1)
        sig = sig + chunk * shift
        shift = shift * (1 << bits)
        remaining -= bits
    return sig


def num_fallback_chunks(total_bits: int) -> int:
    return -(-total_bits // CHUNK_BITS)


def block_starts(sig, divisors, multipliers, offsets, value_mask: int, num_starts: int):  # type: ignore[no-untyped-def]
    """Start offset in the shared memory of every block of every token.

    Args:
        sig: packed signatures, (...,) int64.
        divisors: (T, K) int64, ``2 ** (bits * position)`` of the K packed values block t reads.
        multipliers: (T, K) int64 in [1, P): the linear hash of the K values, one row per block.
        offsets: (T,) int64 in [0, P): the block's additive constant (hashes in the block index).
        value_mask: ``2 ** bits - 1``.
        num_starts: m - Z + 1, the number of valid start offsets.

    Returns:
        (..., T) int64 in [0, num_starts).

    Two tokens that agree on the K values block t reads get the same start; otherwise their
    starts collide with probability ~1/num_starts (Carter-Wegman: a linear form mod a prime is
    universal over vectors with entries below P).
    """
    values = (sig[..., None, None] // divisors) & value_mask  # (..., T, K)
    return ((values * multipliers).sum(-1) + offsets) % 2147483647 % num_starts  # (..., T)
