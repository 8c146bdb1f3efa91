"""Offline minhash signatures of tokens, from a uniform row sample (DESIGN section 4, items 1-2).

The semantic set of a token is
- ``rows``: the set of sample row indices it occurs in (the paper's definition), or
- ``context``: the set of other-field tokens it co-occurs with in the sample (makes same-field tokens
  comparable).

For each of ``num_hashes`` universal hash functions h_j, the token's minhash is min over its set of
h_j(element); its lowest ``bits`` bits are packed into one int64 (value j at bits [j*b, (j+1)*b)).
Everything is vectorised: one sort of the (token, element) pairs, then one ``np.minimum.reduceat``
per hash function; no per-token Python objects, so tens of millions of pairs are fine.

Only tokens that occur at least ``min_count`` times in the sample are candidates; the most frequent
are stored first, up to the signature table's capacity (its byte share of the budget). Every other
token gets a signature hashed from its key inside the graph (models.inthash.fallback_signatures).
"""

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from models import inthash
from models.embeddings import EmbeddingConfig


@dataclass
class SignatureSet:
    """Tokens in priority order (most frequent first) with their packed signatures."""

    keys: np.ndarray  # int64 (n,)
    signatures: np.ndarray  # int64 (n,)
    counts: np.ndarray  # int64 (n,), occurrences in the sample
    report: dict[str, float]


def minhash_params(config: EmbeddingConfig) -> np.ndarray:
    """(num_hashes, 3) parameters of the minhash functions; a function of the embedding seed only."""
    return inthash.draw_params(np.random.default_rng([config.seed, 0x5EED]), config.num_hashes)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(n, H) values below 2**bits -> (n,) int64 with value j at bits [j*bits, (j+1)*bits)."""
    shifts = (2 ** (bits * np.arange(values.shape[1], dtype=np.int64))).astype(np.int64)
    return (values.astype(np.int64) * shifts).sum(axis=1)


def unpack(signatures: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: (n,) -> (n, count)."""
    divisors = (2 ** (bits * np.arange(count, dtype=np.int64))).astype(np.int64)
    return (signatures[:, None] // divisors) & ((1 << bits) - 1)


def compute_signatures(
    sample_keys: np.ndarray,
    config: EmbeddingConfig,
    capacity: int,
    progress: bool = False,
) -> SignatureSet:
    """Minhash signatures of the ``capacity`` most frequent eligible tokens of a row sample.

    Args:
        sample_keys: int64 (R, F) token keys of the sampled rows.
        config: embedding config (num_hashes, bits, semantic, min_count, seed).
        capacity: how many signatures the table can hold.
        progress: show a progress bar over the hash functions.
    """
    start = time.perf_counter()
    sample_keys = np.ascontiguousarray(sample_keys, dtype=np.int64)
    if sample_keys.ndim != 2:
        raise ValueError(f"sample_keys must be (rows, fields), got shape {sample_keys.shape}")
    num_rows, num_fields = sample_keys.shape
    flat = sample_keys.ravel()
    tokens, token_of, counts = np.unique(flat, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts >= config.min_count)
    # Priority: most frequent first, ties by key, so the choice is deterministic.
    priority = eligible[np.lexsort((tokens[eligible], -counts[eligible]))][: max(capacity, 0)]

    params = minhash_params(config)
    order = np.argsort(token_of, kind="stable")  # pairs grouped by token
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows_sorted = (order // num_fields).astype(np.int64)
    mask = (1 << config.bits) - 1
    values = np.empty((tokens.size, config.num_hashes), dtype=np.int64)
    for j in tqdm(range(config.num_hashes), desc="minhash", disable=not progress, leave=False):
        a, b, c = (int(x) for x in params[j])
        if config.semantic == "rows":
            element_hash = inthash.hash_halves(0, rows_sorted, a, b, c)
        else:  # context: min over the row's other tokens = row min, or second min at the argmin
            h = inthash.hash_key(sample_keys, a, b, c)  # (R, F)
            if num_fields < 2:
                raise ValueError("semantic mode 'context' needs at least two categorical fields")
            two = np.partition(h, 1, axis=1)[:, :2]  # (R, 2): smallest, second smallest
            excl = np.broadcast_to(two[:, :1], h.shape).copy()
            excl[np.arange(num_rows), h.argmin(axis=1)] = two[:, 1]
            element_hash = excl.ravel()[order]
        values[:, j] = np.minimum.reduceat(element_hash, starts) & mask
    signatures = pack(values[priority], config.bits)
    stored_occurrences = int(counts[priority].sum())
    report = {
        "sample_rows": int(num_rows),
        "sample_tokens": int(tokens.size),
        "eligible_tokens": int(eligible.size),
        "signed_tokens": int(priority.size),
        "capacity": int(capacity),
        "occurrence_coverage": stored_occurrences / max(flat.size, 1),
        "seconds": time.perf_counter() - start,
    }
    return SignatureSet(tokens[priority], signatures, counts[priority], report)
