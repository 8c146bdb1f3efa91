"""Categorical columns -> token keys, in NumPy, through a per-thread cache of the schema's hash.

The key of a value is :meth:`models.schema.FeatureSchema.key` (seeded BLAKE2b, in Python). Criteo
and Avazu values are at most 8 bytes (hex ids, small numbers), so a value fits one ``uint64``
(little-endian, zero-padded; values never hold a NUL byte, so the packing is one-to-one and 0 is
the missing value). :class:`KeyCache` keeps, per field, a direct-mapped table ``packed value ->
key`` of 2**16 slots: a column's keys are a multiply-shift, two gathers and a compare per value,
and only the values that miss (new, or evicted by another value of the same slot) go to the
schema's hash, once per distinct value. A column with a longer value takes the general path:
Arrow's dictionary encoding, then the schema's hash of each distinct value.

A cache belongs to one thread (its slot writes are not atomic); the readers make one per worker.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from models.data.parse import Column, factorize
from models.schema import FeatureSchema

SLOT_BITS = 16
_EMPTY = np.uint64(2**64 - 1)  # 8 bytes of 0xFF: not UTF-8, so never a value
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top SLOT_BITS bits of value * this
_SHIFT = np.uint64(64 - SLOT_BITS)
_SLOT = np.dtype([("value", "<u8"), ("key", "<i8")])  # one record per slot: one memory access per lookup
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # first L bytes


def pack(column: pa.ChunkedArray) -> np.ndarray | None:
    """A string column -> uint64 (n,) of its values' bytes (missing -> 0); None if a value is longer than 8 bytes.

    A fixed-size 8-byte column (Criteo, :mod:`models.data.parse`) already is that array; Arrow writes
    zero bytes for a null, so a missing value packs as 0 there too.
    """
    if pa.types.is_fixed_size_binary(column.type) and column.type.byte_width == 8:
        return np.concatenate(
            [np.frombuffer(c.buffers()[1], "<u8", count=len(c), offset=8 * c.offset) for c in column.chunks]
            or [np.zeros(0, np.uint64)]
        )
    parts = []
    for chunk in column.chunks:
        n = len(chunk)
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + n + 1]
        lengths = np.diff(offsets)
        longest = int(lengths.max()) if n else 0
        if longest > 8:
            return None
        data = chunk.buffers()[2]
        size = int(offsets[-1] - offsets[0])
        if longest == 8 and size == 8 * int(np.count_nonzero(lengths)) and offsets[0] % 8 == 0:
            # Every value is 8 bytes or missing (Criteo's hex ids): the data buffer is the packed values.
            packed = np.zeros(n, np.uint64)
            packed[lengths == 8] = np.frombuffer(data, "<u8", count=size // 8, offset=int(offsets[0]))
        else:
            padded = (data.to_pybytes() if data is not None else b"") + bytes(8)
            # words[j] = the 8 bytes starting at data[j], first byte lowest (an overlapping view, no copy)
            words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
            packed = words[offsets[:-1]] & _LOW_BYTES[lengths]
        # A null was empty text (the readers' only null value), which Arrow stores as zero bytes: it packs as 0.
        parts.append(packed)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


class KeyCache:
    """Token keys of categorical columns for one schema; one instance per thread."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self._tables = []
        for _ in range(schema.num_fields):
            table = np.zeros(1 << SLOT_BITS, _SLOT)
            table["value"] = _EMPTY
            self._tables.append(table)

    def keys(self, field_index: int, column: pa.ChunkedArray | Column) -> np.ndarray:
        """int64 (n,) keys of a column of field ``field_index``, exactly ``schema.key(field_index, value)``."""
        packed = pack(column) if isinstance(column, pa.ChunkedArray) else None
        if packed is None:  # a derived column, or values longer than 8 bytes
            col = factorize(column)
            return self.schema.field_keys(field_index, col.values)[col.codes]
        table = self._tables[field_index]
        found = table[((packed * _MULTIPLIER) >> _SHIFT).astype(np.intp)]
        out = found["key"]
        miss = found["value"] != packed
        if miss.any():
            distinct, inverse = np.unique(packed[miss], return_inverse=True)
            text = [b.decode("utf-8") for b in distinct.view("S8").tolist()]  # S8 drops the zero padding
            new_keys = self.schema.field_keys(field_index, text)
            out[miss] = new_keys[inverse.reshape(-1)]
            new = np.empty(len(distinct), _SLOT)
            new["value"], new["key"] = distinct, new_keys
            table[((distinct * _MULTIPLIER) >> _SHIFT).astype(np.intp)] = new  # a slot two values share keeps one
        return out
