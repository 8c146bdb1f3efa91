"""Overflow-free integer hashing shared by NumPy, eager PyTorch, TorchScript and ONNX.

Every hash in the model is universal hashing modulo the Mersenne prime P = 2**31 - 1 with operands
below 2**31, so no intermediate exceeds 2**63 and int64 arithmetic is exact everywhere. The
functions below use only ``+ * // % &`` on non-negative integers, and never sum a tensor (ONNX
Runtime reduces int64 through double): called with NumPy arrays they run in NumPy, called with
tensors they run in PyTorch, and ``torch.jit.script`` compiles them (they are reached from the
embedding and table modules' ``forward``) into graphs that export to ONNX as Add/Mul/Div/Mod/BitwiseAnd.
``tests/models/test_inthash.py`` pins golden values for all of them.

A 62-bit token key is split as ``key = hi * 2**31 + lo`` with both halves below 2**31, and hashed
as ``(a * hi + b * lo + c) % P``. With a, b, c < P and hi, lo < 2**31 the sum is below
2 * (2**31 - 2) * (2**31 - 1) + 2**31 < 2**63, so it needs no intermediate ``% P``.

LMA locations (scheme :data:`LOCATION_SCHEME`, DESIGN section 4 item 4): block t of a token reads
row ``start_t`` of the shared memory viewed as (num_starts, Z). Every token has a packed signature:
its stored minhash signature, or (no stored one) a signature hashed from its key, whose two 31-bit
halves are two universal hashes of the key (:func:`key_hashes`, computed with the signature table's
bucket hashes in one pass). Block t masks the signature to the K packed values it reads and hashes
the masked value's two 31-bit halves (:func:`block_rows`): two tokens that agree on those K values
get the same row; other pairs collide with probability ~1/num_starts.

Layout: the hash or block index is the FIRST axis ((H, B, F), (T, B, F)) and the parameters have
shape (H, 1, 1): every elementwise op then broadcasts a scalar over a whole (B, F) slab. With the
small axis last, ONNX Runtime loops over spans of 2-4 elements, ~10x slower per element (measured).
"""

from __future__ import annotations

import numpy as np

PRIME = 2**31 - 1
HALF = 2**31  # keys split into two 31-bit halves
LOW_MASK = HALF - 1
# Versions of how LMA block locations are computed. A run trained with another scheme has its shared
# memory laid out for other rows and is refused (models.embeddings.EmbeddingConfig), never reinterpreted.
LEGACY_LOCATION_SCHEME = "lma-locations-v1"  # K values x multipliers summed per block, 30-bit fallback chunks
LOCATION_SCHEME = "lma-locations-v2"  # masked signature, universal hash of its 31-bit halves


def key_halves(keys):  # type: ignore[no-untyped-def]
    """62-bit keys -> (hi, lo), each below 2**31."""
    # Literals, not the module constants: TorchScript cannot read Python globals.
    return keys // 2147483648, keys & 2147483647


def hash_halves(hi, lo, a: int, b: int, c: int):  # type: ignore[no-untyped-def]
    """Universal hash of a split key into [0, P). Requires a, b, c < P and hi, lo < 2**31."""
    return (hi * a + lo * b + c) % 2147483647


def hash_key(keys, a: int, b: int, c: int):  # type: ignore[no-untyped-def]
    hi, lo = key_halves(keys)
    return hash_halves(hi, lo, a, b, c)


def key_hashes(keys, a, b, c):  # type: ignore[no-untyped-def]
    """H universal hashes of every key at once: keys (B, F), parameters a, b, c (H, 1, 1) -> (H, B, F) in [0, P).

    Hash h equals ``hash_key(keys, a[h], b[h], c[h])``: one vectorised pass instead of H (what the
    exported graphs pay per node matters at small batches). Parameters of shape (H, 1) hash 1-D keys.
    """
    return ((keys // 2147483648) * a + (keys & 2147483647) * b + c) % 2147483647


def draw_params(rng: np.random.Generator, n: int) -> np.ndarray:
    """n rows of (a, b, c) hash parameters: a, b in [1, P), c in [0, P). int64 (n, 3)."""
    ab = rng.integers(1, PRIME, size=(n, 2), dtype=np.int64)
    c = rng.integers(0, PRIME, size=(n, 1), dtype=np.int64)
    return np.concatenate([ab, c], axis=1)


def value_masks(positions: np.ndarray, bits: int) -> np.ndarray:
    """(T, 2) int64: the two 31-bit halves (hi, lo) of the mask of the packed values block t reads
    (``positions`` (T, K) of ``bits``-bit values)."""
    masks = [sum(((1 << bits) - 1) << (bits * int(p)) for p in row) for row in positions.tolist()]
    return np.array([[m >> 31, m & LOW_MASK] for m in masks], dtype=np.int64).reshape(len(masks), 2)


def block_rows(hi, lo, mask_hi, mask_lo, a, b, c, num_starts: int):  # type: ignore[no-untyped-def]
    """Row of the shared memory that every block of every token reads.

    Args:
        hi, lo: the 31-bit halves of the tokens' packed signatures, (1, B, F) or (B, F) int64 (``key_halves``);
            ``lo`` may be the whole signature: ``mask_lo`` keeps only bits below 31.
        mask_hi, mask_lo: (T, 1, 1) halves of the mask of the K packed values block t reads (:func:`value_masks`).
        a, b, c: (T, 1, 1) universal hash parameters of block t (a, b in [1, P), c in [0, P)).
        num_starts: rows of the shared memory.

    Returns:
        (T, B, F) int64 in [0, num_starts).

    Block t hashes the signature masked to its K values, ``sig & mask_t``, by its halves:
    ``(a * (hi & mask_hi) + b * (lo & mask_lo) + c) % P % num_starts``. Two signatures that agree on
    those K values get the same row; for any other pair the hash collides with probability
    <= 1/(P - 1) (Carter-Wegman), then ~1/num_starts from the final modulo. Halves below 2**31 and
    parameters below P keep the sum below 2**63: exact int64, no reduction through double.
    """
    return ((hi & mask_hi) * a + (lo & mask_lo) * b + c) % 2147483647 % num_starts
