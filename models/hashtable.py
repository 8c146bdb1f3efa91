"""A static two-choice bucketed cuckoo hash table from int64 token keys to int64 values.

Built once offline (NumPy), looked up inside the model graph with a fixed number of steps: two
bucket hashes, one gather of both candidate buckets (keys and values of a bucket in one row), a
full-key compare, a max-select. Lookups are exact (a stored key is always found, an absent key never
is) and use only Add/Mul/Div/Mod/BitwiseAnd/Gather/Transpose/Split/Equal/Where/ReduceMax, so TorchScript
and ONNX express them. Empty slots hold key -1 and value -1 (real keys are non-negative 62-bit integers,
so they never match; stored values are non-negative).

Used twice: the LMA embedding maps keys to minhash signatures, the full embedding maps keys to rows.

Memory: ``num_buckets * slots * 16`` bytes (keys and values, empty slots included), plus six seeds
(the owner counts the parameters of any extra hashes it asks for).
"""

from typing import ClassVar, List  # noqa: UP035 (TorchScript reads typing.List)

import numpy as np
import torch
from torch import nn

from models import inthash

EMPTY = -1
SLOT_BYTES = 16  # int64 key + int64 value


def bucket_hashes(keys, params: list[list[int]], bucket_mask: int):  # type: ignore[no-untyped-def]
    """The two candidate buckets of every key."""
    hi, lo = inthash.key_halves(keys)
    p1, p2 = params[0], params[1]
    b1 = inthash.hash_halves(hi, lo, p1[0], p1[1], p1[2]) & bucket_mask
    b2 = inthash.hash_halves(hi, lo, p2[0], p2[1], p2[2]) & bucket_mask
    return b1, b2


def table_bytes(num_buckets: int, slots: int) -> int:
    """Every byte of a table: keys and values of all slots (empty ones too) and its six seeds."""
    return num_buckets * slots * SLOT_BYTES + 6 * 8 if num_buckets else 0


def buckets_for_bytes(byte_budget: int, slots: int) -> int:
    """Largest power-of-two bucket count whose whole table (seeds included) fits ``byte_budget``."""
    room = (byte_budget - 6 * 8) // (slots * SLOT_BYTES)
    return 1 << (room.bit_length() - 1) if room >= 1 else 0


class BuildReport(dict):
    """inserted / dropped counts and the load factor, kept in metrics and manifests."""


def build_table(
    keys: np.ndarray,
    values: np.ndarray,
    num_buckets: int,
    slots: int,
    seed: int,
    max_load: float = 0.9,
    max_kicks: int = 500,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, BuildReport]:
    """Insert ``keys -> values`` in priority order (first = most important) into a cuckoo table.

    At most ``max_load * capacity`` keys are inserted; keys that do not fit (over the load limit or
    after ``max_kicks`` evictions) are dropped from the end of the priority order and reported.

    Returns:
        table_keys (num_buckets, slots), table_values (num_buckets, slots), params (2, 3), report.
    """
    keys = np.asarray(keys, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    if keys.shape != values.shape or keys.ndim != 1:
        raise ValueError(f"keys and values must be 1-D of one length, got {keys.shape} and {values.shape}")
    if num_buckets & (num_buckets - 1) or num_buckets < 0:
        raise ValueError(f"num_buckets must be a power of two, got {num_buckets}")
    if keys.size and (keys.min() < 0):
        raise ValueError("keys must be non-negative")
    if np.unique(keys).size != keys.size:
        raise ValueError("keys must be unique")
    rng = np.random.default_rng(seed)
    params = inthash.draw_params(rng, 2)
    table_keys = np.full((max(num_buckets, 1), slots), EMPTY, dtype=np.int64)
    table_values = np.zeros((max(num_buckets, 1), slots), dtype=np.int64)
    if num_buckets == 0:
        return table_keys[:0], table_values[:0], params, BuildReport(inserted=0, dropped=int(keys.size), load=0.0)

    limit = min(keys.size, int(max_load * num_buckets * slots))
    cand, dropped = keys[:limit], int(keys.size - limit)
    cand_values = values[:limit]
    b1, b2 = bucket_hashes(cand, params.tolist(), num_buckets - 1)
    fill = np.zeros(num_buckets, dtype=np.int64)
    placed = np.zeros(cand.size, dtype=bool)
    # Vectorised passes: first every key into its first bucket, then the rest into the second,
    # each bucket taking keys in priority order until it is full.
    for buckets in (b1, b2):
        todo = np.flatnonzero(~placed)
        bk = buckets[todo]
        order = np.argsort(bk, kind="stable")  # stable: priority order kept inside a bucket
        todo, bk = todo[order], bk[order]
        starts = np.searchsorted(bk, bk, side="left")
        rank = np.arange(bk.size) - starts + fill[bk]
        ok = rank < slots
        table_keys[bk[ok], rank[ok]] = cand[todo[ok]]
        table_values[bk[ok], rank[ok]] = cand_values[todo[ok]]
        placed[todo[ok]] = True
        np.add.at(fill, bk[ok], 1)
    # Cuckoo random walk for the few that are left (both buckets full).
    left = np.flatnonzero(~placed)
    first, second = b1, b2
    mask = num_buckets - 1
    hp = params.tolist()
    for i in left:
        k, v = int(cand[i]), int(cand_values[i])
        bucket = int(first[i]) if rng.random() < 0.5 else int(second[i])
        for _ in range(max_kicks):
            free = np.flatnonzero(table_keys[bucket] == EMPTY)
            if free.size:
                table_keys[bucket, free[0]], table_values[bucket, free[0]] = k, v
                k = -1
                break
            s = int(rng.integers(slots))
            k, table_keys[bucket, s] = int(table_keys[bucket, s]), k
            v, table_values[bucket, s] = int(table_values[bucket, s]), v
            c1, c2 = bucket_hashes(np.int64(k), hp, mask)
            bucket = int(c2) if int(c1) == bucket else int(c1)
        if k != -1:
            dropped += 1  # the key evicted last finds no home: it falls back (never a wrong hit)
    inserted = int((table_keys != EMPTY).sum())
    report = BuildReport(inserted=inserted, dropped=dropped, load=inserted / (num_buckets * slots))
    return table_keys, table_values, params, report


class StaticHashTable(nn.Module):
    """Exact in-graph lookup of int64 keys (B, F) in a table made by :func:`build_table`.

    One pass per key (what the exported graphs pay per node matters at small batches): the two bucket
    hashes, and any extra hashes the owner needs, come out of one :func:`inthash.key_hashes` as (H, B, F);
    both candidate buckets come out of one gather, because a bucket's keys and values sit side by side
    in one row of ``rows`` (num_buckets, 2 * slots): with 4 slots, 64 bytes, one cache line. The stored
    value is picked with a max over the slots (empty and non-matching slots give -1), never a sum:
    ONNX Runtime reduces int64 sums through double, which would round 60-bit values.

    Args:
        num_buckets: power of two (0 = empty table: every lookup returns the default).
        slots: slots per bucket.
        extra_params: (E, 3) parameters of E more universal hashes of every key, in [0, 2**31 - 1),
            returned by :meth:`lookup` (the LMA embedding's fallback signatures).

    Example::

        >>> k, v, p, _ = build_table(np.array([5, 9]), np.array([50, 90]), 4, 2, seed=0)
        >>> t = StaticHashTable(4, 2); t.load(k, v, p)
        >>> t(torch.tensor([[5, 7]]), torch.tensor([[-1, -1]]))[0].tolist()
        [[50, -1]]
    """

    __jit_unused_properties__: ClassVar[list[str]] = ["memory_bytes", "table_keys", "table_values"]
    params: List[List[int]]  # noqa: UP006 (TorchScript reads typing.List)
    rows: torch.Tensor
    hash_params: torch.Tensor
    extra_hash_params: torch.Tensor
    hash_a: torch.Tensor
    hash_b: torch.Tensor
    hash_c: torch.Tensor
    hash_masks: torch.Tensor

    def __init__(self, num_buckets: int, slots: int, extra_params: np.ndarray | None = None) -> None:
        super().__init__()
        if num_buckets < 0 or num_buckets & (num_buckets - 1):
            raise ValueError(f"num_buckets must be 0 or a power of two, got {num_buckets}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        extra = np.zeros((0, 3), dtype=np.int64) if extra_params is None else np.asarray(extra_params, dtype=np.int64)
        if extra.ndim != 2 or extra.shape[1] != 3:
            raise ValueError(f"extra_params must be (E, 3) hash parameters, got shape {extra.shape}")
        self.num_buckets = num_buckets
        self.slots = slots
        self.bucket_mask = max(num_buckets - 1, 0)
        self.num_extra = int(extra.shape[0])
        self.register_buffer("rows", torch.full((num_buckets, 2 * slots), EMPTY, dtype=torch.int64))
        self.register_buffer("hash_params", torch.zeros((2, 3), dtype=torch.int64))
        self.register_buffer("extra_hash_params", torch.from_numpy(extra.copy()))
        # The (H, 1, 1) parameter columns of key_hashes: buckets (when there is a table), then the extra
        # hashes, and the mask each result is cut to. Derived from the two buffers above (sync_params).
        for name in ("hash_a", "hash_b", "hash_c", "hash_masks"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.int64), persistent=False)
        self.params = [[0, 0, 0], [0, 0, 0]]
        self.sync_params()

    def load(self, table_keys: np.ndarray, table_values: np.ndarray, params: np.ndarray) -> None:
        for table in (table_keys, table_values):
            if table.shape != (self.num_buckets, self.slots):
                raise ValueError(f"table shape {table.shape} != {(self.num_buckets, self.slots)}")
        occupied = table_keys != EMPTY
        if (table_values[occupied] < 0).any():
            raise ValueError("stored values must be non-negative (the lookup selects the stored value with a max)")
        values = np.where(occupied, table_values, EMPTY)  # an empty slot's value is -1 too: never selected
        self.rows.copy_(torch.from_numpy(np.ascontiguousarray(np.concatenate([table_keys, values], axis=1))))
        self.hash_params.copy_(torch.from_numpy(np.asarray(params, dtype=np.int64)))
        self.sync_params()

    def sync_params(self) -> None:
        """Copy the hash parameters from the buffers into Python ints and the key_hashes columns (graph constants)."""
        self.params = self.hash_params.tolist()
        columns = torch.cat([self.hash_params, self.extra_hash_params]) if self.num_buckets else self.extra_hash_params
        self.hash_a = columns[:, 0].reshape(-1, 1, 1).clone()
        self.hash_b = columns[:, 1].reshape(-1, 1, 1).clone()
        self.hash_c = columns[:, 2].reshape(-1, 1, 1).clone()
        masks = [self.bucket_mask] * (2 if self.num_buckets else 0) + [-1] * self.num_extra  # -1: all bits kept
        self.hash_masks = torch.tensor(masks, dtype=torch.int64, device=self.hash_params.device).reshape(-1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Run folders written before keys and values shared one row per bucket hold them apart.
        keys, values = state_dict.pop(prefix + "table_keys", None), state_dict.pop(prefix + "table_values", None)
        if keys is not None and values is not None and prefix + "rows" not in state_dict:
            state_dict[prefix + "rows"] = torch.cat([keys, torch.where(keys == EMPTY, EMPTY, values)], 1)
        if prefix + "extra_hash_params" not in state_dict and self.num_extra == 0:
            state_dict[prefix + "extra_hash_params"] = self.extra_hash_params
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_params()

    @property
    def table_keys(self) -> torch.Tensor:
        """(num_buckets, slots) stored keys, -1 in empty slots (a view of ``rows``)."""
        return self.rows[:, : self.slots]

    @property
    def table_values(self) -> torch.Tensor:
        """(num_buckets, slots) stored values, -1 in empty slots (a view of ``rows``)."""
        return self.rows[:, self.slots :]

    @property
    def memory_bytes(self) -> int:
        return table_bytes(self.num_buckets, self.slots)

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:  # noqa: UP006
        """(value, found, extra) of ``keys`` (B, F): the stored value or -1 (B, F), whether it was found (B, F),
        and the E extra hashes, each (1, B, F) in [0, 2**31 - 1)."""
        h = inthash.key_hashes(keys, self.hash_a, self.hash_b, self.hash_c)  # (2 + E, B, F)
        if self.num_buckets == 0:  # extra hashes only, which keep every bit: no mask (one graph node fewer)
            return torch.full_like(keys, -1), torch.zeros_like(keys, dtype=torch.bool), h.split(1, 0)
        h = h & self.hash_masks  # the two bucket hashes cut to the table's size
        parts = h.split([2] + [1] * self.num_extra, 0) if self.num_extra else [h]  # buckets, then each extra hash
        # (2S, 2, B, F): both candidate buckets, keys then values, slot-major. The gather reads whole 64-byte rows;
        # the one transpose after it lets the split, the compare, the select and the max run over (B, F) spans.
        # Slot-last, ONNX Runtime broadcasts the key against spans of S = 4 values, at ~10 ns a span.
        rows = self.rows[parts[0]].permute(3, 0, 1, 2)
        stored_keys, stored_values = rows.split(self.slots, 0)  # (S, 2, B, F) each
        # A key sits in at most one slot (or twice in one bucket when its two buckets coincide, with one value).
        hit = stored_keys == keys
        value = torch.where(hit, stored_values, -1).amax((0, 1))  # (B, F)
        return value, value >= 0, parts[1:]

    def forward(self, keys: torch.Tensor, default: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, found) of ``keys`` (B, F); ``default`` (broadcastable) where a key is absent."""
        if self.num_buckets == 0:
            return default.expand(keys.shape), torch.zeros_like(keys, dtype=torch.bool)
        value, found, _ = self.lookup(keys)
        return torch.where(found, value, default), found
