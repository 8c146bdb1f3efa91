"""Feature schema and token keys: the one place raw values become model inputs.

Training, export and serving all import this module; nothing else turns a raw value into a
number. DESIGN section 3:

- dense values: missing -> 0, negative clipped to 0, then log(1 + x) (the DLRM Criteo convention);
  the transform happens here, in :func:`transform_dense`, and the exported graphs take the
  *transformed* values (every manifest says ``"dense_input": "log1p-clip0"``, :data:`DENSE_TRANSFORM`,
  which the schema also records as its ``dense_transform``);
- categorical values: each (field, raw value) becomes a non-negative 62-bit integer key with one
  seeded hash (BLAKE2b-64 keyed by the schema seed and the field name, top two bits dropped).
  Raw values are hashed by their text: ``"68fd1e64"``, ``"1005"`` and ``1005`` (an int is formatted
  in decimal first) — so ``1005`` and ``"1005"`` are the same token. A missing value (``None`` or
  ``""``) is a token of its own per field.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.jit import kernel

KEY_BITS = 62
KEY_MASK = (1 << KEY_BITS) - 1
HASH_SCHEME = "blake2b64-field-keyed-v1"
DENSE_TRANSFORM = "log1p-clip0"
# The missing marker cannot collide with a real value: real values are hashed with a 0x00 prefix.
_MISSING = b"\x01"
# Cached keys of hot values, all fields together (split evenly): ~120 bytes an entry, so at most ~125 MB.
# Zipf-distributed values hit it most of the time; a field whose cache fills up starts over empty.
_CACHE_ENTRIES = 1 << 20
# PackedKeys: slots of (packed value, key); 8 bytes of 0xFF is not UTF-8, so it is never a value
_SLOT = np.dtype([("value", "<u8"), ("key", "<i8")])
_EMPTY = np.uint64(2**64 - 1)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top slot_bits bits of value * this
WAYS = 4  # slots of one bucket of PackedKeys: 4 x 16 bytes, one cache line
_BUCKET = np.uint64(2**64 - WAYS)  # a hash's bucket starts at a slot number divisible by WAYS
_CACHE_LINE = 64

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
AVAZU_COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
# `hour` (YYMMDDHH) becomes two fields; `id` and `click` are not features.
AVAZU_CATEGORICAL = ("hour_of_day", "weekday", *AVAZU_COLUMNS[3:])


@dataclass(frozen=True)
class FeatureSchema:
    """Names of the dense and categorical features, and the seed of the token hash.

    Args:
        dense_names: dense feature names, in graph input order (may be empty).
        categorical_names: categorical field names, in graph input order (at least one).
        hash_seed: seed of the key hash; part of every checkpoint and bundle.

    Example::

        >>> s = FeatureSchema(("I1",), ("C1", "C2"))
        >>> s.keys_for([["a", None]]).shape
        (1, 2)
    """

    dense_names: tuple[str, ...]
    categorical_names: tuple[str, ...]
    hash_seed: int = 0
    hash_scheme: str = HASH_SCHEME
    dense_transform: str = DENSE_TRANSFORM
    _hashers: list[_FieldHasher] = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment,arg-type]
    _caches: list[dict[object, int]] = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment,arg-type]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_names", tuple(self.dense_names))
        object.__setattr__(self, "categorical_names", tuple(self.categorical_names))
        if not self.categorical_names:
            raise ValueError("categorical_names must name at least one field")
        names = self.dense_names + self.categorical_names
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        if self.hash_scheme != HASH_SCHEME:
            raise ValueError(f"unknown hash_scheme {self.hash_scheme!r}; this build knows {HASH_SCHEME!r}")
        if self.dense_transform != DENSE_TRANSFORM:
            raise ValueError(f"unknown dense_transform {self.dense_transform!r}; this build knows {DENSE_TRANSFORM!r}")
        if not 0 <= self.hash_seed < 2**63:
            raise ValueError(f"hash_seed must be in [0, 2**63), got {self.hash_seed}")
        limit = max(1, _CACHE_ENTRIES // len(self.categorical_names))
        hashers = [_FieldHasher(self.hash_seed, n, limit) for n in self.categorical_names]
        object.__setattr__(self, "_hashers", hashers)
        object.__setattr__(self, "_caches", [h.cache for h in hashers])

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def num_fields(self) -> int:
        return len(self.categorical_names)

    def key(self, field_index: int, value: object) -> int:
        """Key of one raw value of field ``field_index``."""
        return self._hashers[field_index](value)

    def field_keys(self, field_index: int, values: Sequence[object]) -> np.ndarray:
        """Keys of many raw values of field ``field_index`` -> int64 (n,); the same as :meth:`key` of each.

        The readers call this once per block and field with the block's distinct values: the lookups
        of values seen before run at C speed (``map`` over the field's cache), only new ones are hashed.
        """
        return np.array(self._hashers[field_index].many(values), dtype=np.int64)

    def keys_for(self, rows: Sequence[Sequence[object]]) -> np.ndarray:
        """Keys of raw categorical rows, each a sequence of ``num_fields`` values -> int64 (B, F)."""
        for i, row in enumerate(rows):
            if len(row) != self.num_fields:
                raise ValueError(f"row {i} has {len(row)} categorical values, expected {self.num_fields}")
        return self.keys_flat(list(itertools.chain.from_iterable(rows)), len(rows))

    def keys_flat(self, values: list[object], rows: int) -> np.ndarray:
        """Keys of ``rows`` x ``num_fields`` raw values given row-major in one flat list -> int64 (rows, F).

        The values must be ``None``, ``str``, ``bytes`` or ``int`` (not ``bool``, not ``float``: a float
        ``1.0`` would find the cached key of ``1``); the server validates them before they get here.
        Hot values cost one C-level dict lookup each (``map(dict.get, ...)`` over the whole batch, read by
        ``np.fromiter``); only cache misses run the hash, and :meth:`_FieldHasher.__call__` caches what it
        computes.
        """
        if len(values) != rows * self.num_fields:
            raise ValueError(f"{len(values)} categorical values do not fill {rows} rows of {self.num_fields}")
        hashers = self._hashers
        n = len(values)
        # dict.get(cache, value, -1) for every value, consumed in C by fromiter: no Python list in between
        keys = np.fromiter(map(dict.get, self._caches * rows, values, itertools.repeat(-1, n)), np.int64, count=n)
        misses = np.flatnonzero(keys < 0)
        if misses.size:
            f = len(hashers)
            for i in misses.tolist():
                keys[i] = hashers[i % f](values[i])
        return keys.reshape(rows, len(hashers))

    def to_dict(self) -> dict[str, object]:
        return {
            "dense_names": list(self.dense_names),
            "categorical_names": list(self.categorical_names),
            "hash_seed": self.hash_seed,
            "hash_scheme": self.hash_scheme,
            "dense_transform": self.dense_transform,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeatureSchema:
        known = {"dense_names", "categorical_names", "hash_seed", "hash_scheme", "dense_transform"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature-schema entries: {sorted(unknown)}")
        return cls(
            dense_names=tuple(d["dense_names"]),  # type: ignore[arg-type]
            categorical_names=tuple(d["categorical_names"]),  # type: ignore[arg-type]
            hash_seed=int(d.get("hash_seed", 0)),  # type: ignore[call-overload]
            hash_scheme=str(d.get("hash_scheme", HASH_SCHEME)),
            dense_transform=str(d.get("dense_transform", DENSE_TRANSFORM)),
        )


class _FieldHasher:
    """Seeded BLAKE2b-64 of one field's raw values, with a bounded cache for hot values.

    ``cache`` maps raw values to keys; ``None`` and ``""`` (missing) are always in it.
    """

    __slots__ = ("_h", "cache", "limit", "missing")

    def __init__(self, seed: int, field_name: str, limit: int) -> None:
        key = hashlib.blake2b(seed.to_bytes(8, "little") + field_name.encode("utf-8")).digest()[:32]
        self._h = hashlib.blake2b(digest_size=8, key=key)
        self.limit = limit
        self.missing = self._digest(_MISSING)
        self.cache: dict[object, int] = {None: self.missing, "": self.missing}

    def _digest(self, data: bytes) -> int:
        h = self._h.copy()
        h.update(data)
        return int.from_bytes(h.digest(), "little") & KEY_MASK

    def many(self, values: Sequence[object]) -> list[int]:
        keys: list[int | None] = list(map(self.cache.get, values))
        if None in keys:
            for i in [i for i, k in enumerate(keys) if k is None]:
                keys[i] = self(values[i])
        return keys  # type: ignore[return-value]

    def __call__(self, value: object) -> int:
        if value is None or value == "":  # not through the cache: another thread may be between clear and refill
            return self.missing
        cache = self.cache
        k = cache.get(value) if type(value) is not bool and type(value) is not float else None
        if k is not None:
            return k
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            k = self._digest(b"\x00" + str(value).encode("utf-8", "surrogateescape"))
        elif isinstance(value, bytes):
            k = self._digest(b"\x00" + value)
        else:
            raise TypeError(f"categorical value must be str, int or None, got {type(value).__name__}")
        if len(cache) >= self.limit:
            cache.clear()
            cache[None] = cache[""] = self.missing
        cache[value] = k
        return k


class PackedKeys:
    """Keys of short values packed into ``uint64``, in bulk: a four-way cache of the schema's hash per field.

    A value of at most 8 bytes without a NUL byte packs one-to-one into a ``uint64`` (its UTF-8 bytes,
    little-endian, zero-padded; ``""``, the missing value, packs as 0). Criteo and Avazu values (hex ids,
    small numbers) all do, so the readers (:mod:`models.data.keys`) and the server's binary BYTES tensors
    (:mod:`server.protocols.v2.codec`, and native bodies the server's scan read) hand whole arrays of them
    here. A table of ``2**slot_bits`` slots per field, in buckets of :data:`WAYS`, maps packed value -> key:
    the keys of a (B, F) array are a multiply-shift and up to four compares within one cache line per
    value, and only values that miss (new, or evicted by four newer values of the same bucket) go to
    :meth:`FeatureSchema.field_keys`, once per distinct value. A value that misses takes its bucket's first
    slot and moves the others one slot on; the last one's value leaves. The ways matter more than the
    size: with one slot per hash, two hot values of one slot evicted each other at every turn (the load
    tests' 32-sample requests missed 9.4 of their 832 tokens each, at Python's cost per miss); with pairs,
    every third value of a pair did, and 60% of those requests still had a miss, at ~10 us of NumPy calls
    each; four ways, in the same memory, left none (0 of the 128 request bodies, replayed once warm). The
    keys are exactly ``schema.key(f, value)``. Its slot writes are not atomic: one instance per thread.
    """

    def __init__(self, schema: FeatureSchema, slot_bits: int = 16) -> None:
        if not 2 <= slot_bits <= 30:  # at least one bucket per field
            raise ValueError(f"slot_bits must be in [2, 30], got {slot_bits}")
        self.schema = schema
        slots = schema.num_fields << slot_bits
        # 64-byte aligned, so that each bucket of four 16-byte slots lies in one cache line
        memory = np.empty(slots * _SLOT.itemsize + _CACHE_LINE, np.uint8)
        start = -memory.ctypes.data % _CACHE_LINE
        self._flat = memory[start : start + slots * _SLOT.itemsize].view(_SLOT)
        self._flat["value"] = _EMPTY
        self._flat["key"] = -1  # no key is negative: an empty slot matches no value, not even eight 0xFF bytes
        self._table = self._flat.view(np.uint64).reshape(-1, 2)  # the same memory, as _lookup reads it
        self._base = np.arange(schema.num_fields, dtype=np.intp) << slot_bits  # first slot of each field
        self._shift = np.uint64(64 - slot_bits)
        self._bits = slot_bits

    def _lookup(self, packed: np.ndarray, first_field: int, out: np.ndarray) -> np.ndarray | None:
        """Write the cached keys of ``packed`` (n, k) (fields first_field.. first_field + k - 1) to ``out``;
        the mask of the values that missed (their ``out`` is -1), or None when none did."""
        if _lookup(packed, self._table, first_field, self._bits, out):
            return out == -1
        return None

    def field(self, field_index: int, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """int64 (n,) keys of field ``field_index``'s packed values ``packed`` (uint64 (n,)), in ``out`` if given.

        A reader's block has many misses: each distinct value is hashed once (``field_keys`` of the uniques).
        """
        keys = np.empty(len(packed), np.int64) if out is None else out
        miss = self._lookup(packed.reshape(-1, 1), field_index, keys.reshape(-1, 1))
        if miss is not None:
            miss = miss.reshape(-1)
            distinct, inverse = np.unique(packed[miss], return_inverse=True)
            new_keys = self.schema.field_keys(field_index, _texts(distinct))
            keys[miss] = new_keys[inverse.reshape(-1)]
            self._store(field_index, np.zeros(len(distinct), np.intp), distinct, new_keys)
        return keys

    def rows(self, packed: np.ndarray) -> np.ndarray:
        """int64 (B, F) keys of a (B, F) array of packed values, every field in one pass.

        A request has few misses, all fields together: no sort; the schema's dict cache has most of them.
        """
        keys = np.empty(packed.shape, np.int64)
        miss = self._lookup(packed, 0, keys)
        if miss is not None:
            r, f = np.nonzero(miss)
            values = packed[r, f]
            key = self.schema.key
            text = _texts(values)
            new_keys = np.fromiter((key(j, t) for j, t in zip(f.tolist(), text, strict=True)), np.int64, len(text))
            keys[r, f] = new_keys
            self._store(0, f, values, new_keys)
        return keys

    def _store(self, first_field: int, fields: np.ndarray, values: np.ndarray, keys: np.ndarray) -> None:
        first = (((values * _MULTIPLIER) >> self._shift) & _BUCKET).astype(np.intp) + self._base[first_field + fields]
        new = np.empty(len(values), _SLOT)
        new["value"], new["key"] = values, keys
        # the bucket's values move one slot on (the last one's leaves; a slot is empty only where all after it
        # are), then the new one takes the first; where several misses share a bucket the last one stays
        for way in range(WAYS - 1, 0, -1):
            self._flat[first + way] = self._flat[first + way - 1]
        self._flat[first] = new


@kernel
def _lookup(packed, table, first_field, bits, out):  # type: ignore[no-untyped-def]
    """PackedKeys' four-way lookup of a (n, k) array of packed values of fields first_field..; the number of
    misses (their ``out`` is -1). ``table``: (slots, 2) uint64, value and key of each slot; a value's bucket
    is slots h & ~3 .. h | 3 of its hash h: 64 bytes, one cache line. Compiled, field by field (one field's
    slots stay in cache); unsigned slot numbers, so no negative-index wrap is compiled in."""
    shift = np.uint64(64 - bits)
    misses = 0
    for f in range(packed.shape[1]):
        base = np.uint64((first_field + f) << bits)
        for i in range(packed.shape[0]):
            v = packed[i, f]
            slot = base + (((v * _MULTIPLIER) >> shift) & _BUCKET)
            key = np.int64(-1)
            for way in range(WAYS):
                if table[slot + np.uint64(way), 0] == v:
                    key = np.int64(table[slot + np.uint64(way), 1])  # -1 in an empty slot: eight 0xFF bytes miss
                    break
            out[i, f] = key
            if key < 0:
                misses += 1
    return misses


def warm_kernels() -> None:
    """Compile the key lookup now (or load it from Numba's cache), so that no request waits for it.

    The arguments have the types and layouts of :meth:`PackedKeys.rows` (C-contiguous), which the
    server calls; the readers' column views compile their own specialisation at their first block.
    """
    _lookup(np.zeros((1, 1), np.uint64), np.zeros((WAYS, 2), np.uint64), 0, 2, np.empty((1, 1), np.int64))


def _texts(packed: np.ndarray) -> list[str]:
    """Packed values -> their text (S8 drops the zero padding; surrogateescape gives back exactly these bytes
    when the schema encodes them)."""
    return [b.decode("utf-8", "surrogateescape") for b in packed.view("S8").tolist()]


def transform_dense(raw: np.ndarray | Iterable[Iterable[float]]) -> np.ndarray:
    """Raw dense values -> model inputs: NaN (missing) and infinities -> 0, negative -> 0, then log(1 + x).

    The exported graphs take the output of this function (float32, shape (B, n_dense)).
    """
    x = np.array(raw, dtype=np.float64)  # a copy: transformed in place below
    np.fmax(x, 0.0, out=x)  # NaN, -inf and negatives -> 0 (fmax ignores NaN)
    x[x == np.inf] = 0.0
    return np.log1p(x, out=x).astype(np.float32)


def criteo_schema(hash_seed: int = 0) -> FeatureSchema:
    return FeatureSchema(CRITEO_DENSE, CRITEO_CATEGORICAL, hash_seed)


def avazu_schema(hash_seed: int = 0) -> FeatureSchema:
    return FeatureSchema((), AVAZU_CATEGORICAL, hash_seed)
