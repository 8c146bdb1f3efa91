"""Categorical columns -> token keys, in NumPy, through a per-thread cache of the schema's hash.

The key of a value is :meth:`models.schema.FeatureSchema.key` (seeded BLAKE2b, in Python). Criteo
and Avazu values are at most 8 bytes (hex ids, small numbers), so a value fits one ``uint64``
(little-endian, zero-padded; the readers' values never hold a NUL byte, so the packing is one-to-one
and 0 is the missing value). :class:`KeyCache` packs a column (:func:`pack`) and looks it up in the
schema's direct-mapped cache :class:`models.schema.PackedKeys` (2**16 slots per field): a column's
keys are a multiply-shift, a gather and a compare per value, and only the values that miss go to the
schema's hash, once per distinct value. A column with a longer value takes the general path:
Arrow's dictionary encoding, then the schema's hash of each distinct value.

A cache belongs to one thread (its slot writes are not atomic); the readers make one per worker.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from models.data.parse import Column, factorize
from models.schema import FeatureSchema, PackedKeys, pack_values


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
            values = pack_values(data.to_pybytes() if data is not None else b"", offsets[:-1], lengths)
            if values is None:  # a NUL byte, which the readers' lines never hold (lines.clean_block drops them)
                return None
            packed = values
        # A null was empty text (the readers' only null value), which Arrow stores as zero bytes: it packs as 0.
        parts.append(packed)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


class KeyCache:
    """Token keys of categorical columns for one schema; one instance per thread."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self._packed = PackedKeys(schema)

    def keys(self, field_index: int, column: pa.ChunkedArray | Column) -> np.ndarray:
        """int64 (n,) keys of a column of field ``field_index``, exactly ``schema.key(field_index, value)``."""
        packed = pack(column) if isinstance(column, pa.ChunkedArray) else None
        if packed is None:  # a derived column, or values longer than 8 bytes
            col = factorize(column)
            return self.schema.field_keys(field_index, col.values)[col.codes]
        return self._packed.field(field_index, packed)
