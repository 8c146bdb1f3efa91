"""Training batches from the parsed-array cache (sharded for data-parallel ranks), and distinct tokens.

Example::

    for dense, keys, labels in iter_batches(data, parts["train"], 1024, shuffle=True, seed=0):
        ...  # (B, 13) float32, (B, 26) int64, (B,) float32
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from models.data.cache import Prepared

if TYPE_CHECKING:
    import torch


def _window_rows(batch_size: int) -> int:
    """Rows read from the memmaps at once: a whole number of batches, about 128k rows."""
    return batch_size * max(1, (1 << 17) // batch_size)


def shard_of(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s part of ``rows``: the ``world`` parts are contiguous, in order, and differ by at most one row."""
    return np.array_split(rows, world)[rank]


def iter_batches(
    prepared: Prepared,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (dense (B, n_dense) float32, keys (B, F) int64, labels (B,) float32) of the given rows.

    Every index is read exactly once per call; the last batch may be smaller. With ``shuffle`` the
    indices are permuted by ``seed`` (pass epoch-dependent seeds for a new order each epoch). Rows
    are read a window of ~128k at a time in ascending order, so disk reads stay local even for data
    larger than memory, then put back in the permuted order: batches are exactly the permutation's.

    ``shard = (rank, world)``: every rank computes the same global batches of ``batch_size`` rows and
    yields only its part of each (:func:`shard_of`), reading only those rows; all ranks yield the same
    number of batches (a rank's part of a short last batch may be empty).
    """
    import torch

    rank, world = shard
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}")
    if len(indices) and (indices.min() < 0 or indices.max() >= prepared.rows):
        raise ValueError(f"indices must be in [0, {prepared.rows}), got [{indices.min()}, {indices.max()}]")
    order = np.random.default_rng(seed).permutation(indices) if shuffle else indices
    window = _window_rows(batch_size)
    for start in range(0, len(order), window):
        idx = order[start : start + window]
        starts = range(0, len(idx), batch_size)
        if world > 1:  # this rank's rows of every global batch in the window
            parts = [shard_of(idx[b : b + batch_size], rank, world) for b in starts]
            bounds = np.cumsum([0, *(len(p) for p in parts)])
            idx = np.concatenate(parts)
        else:
            bounds = np.array([*starts, len(idx)])
        ascending = np.argsort(idx, kind="stable")
        rows = idx[ascending]
        arrays = []
        for a in (prepared.dense, prepared.keys, prepared.labels):
            out = np.empty((len(idx), *a.shape[1:]), a.dtype)
            out[ascending] = a[rows]  # read ascending, place in the permuted order
            arrays.append(out)
        dense, keys, labels = arrays
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            yield torch.from_numpy(dense[lo:hi]), torch.from_numpy(keys[lo:hi]), torch.from_numpy(labels[lo:hi])


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (keys, counts) pairs into sorted unique keys with summed counts."""
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if len(keys) == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


def distinct_tokens(
    prepared: Prepared, indices: np.ndarray, chunk_rows: int = 1 << 18
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct token keys over all fields of the given rows, ascending, with their occurrence counts.

    Works ``chunk_rows`` rows at a time (np.unique per field, then a merge), so memory is bounded by
    the number of distinct tokens, not the number of rows. Returns (keys int64, counts int64).
    """
    indices = np.sort(np.asarray(indices, dtype=np.int64))  # ascending reads stay local on disk
    merged: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_size = 0
    for start in range(0, len(indices), chunk_rows):
        keys = prepared.keys[indices[start : start + chunk_rows]]  # (n, F)
        for f in range(keys.shape[1]):
            u, c = np.unique(keys[:, f], return_counts=True)
            pending.append((u, c.astype(np.int64)))
            pending_size += len(u)
        # Merge when the pending parts outgrow the merged set: each key is re-sorted O(log) times.
        if pending_size >= max(len(merged[0]), 1 << 20):
            merged = _merge_counts([merged, *pending])
            pending, pending_size = [], 0
    if pending:
        merged = _merge_counts([merged, *pending])
    return merged
