"""Categorical columns -> token keys, in NumPy, through a per-thread cache of the schema's hash.

The key of a value is :meth:`models.schema.FeatureSchema.key` (seeded BLAKE2b, in Python). Criteo
and Avazu values are at most 8 bytes (hex ids, small numbers), so :mod:`models.data.parse` packs each
into one ``uint64`` as it reads (little-endian, zero-padded; the readers' values never hold a NUL byte,
so the packing is one-to-one and 0 is the missing value). :class:`KeyCache` looks a packed column up
in the schema's four-way cache :class:`models.schema.PackedKeys` (2**16 slots per field, in buckets of
four): a column's keys are a multiply-shift and up to four compares in one cache line per value, and only
the values that miss go to the schema's hash, once per distinct value. A factorised column (a longer
value, or a derived field) takes the schema's hash of each distinct value.

A cache belongs to one thread (its slot writes are not atomic); the readers make one per worker.
"""

from __future__ import annotations

import numpy as np

from models.data.parse import Column
from models.schema import FeatureSchema, PackedKeys


class KeyCache:
    """Token keys of categorical columns for one schema; one instance per thread."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self._packed = PackedKeys(schema)

    def keys(self, field_index: int, column: np.ndarray | Column, out: np.ndarray) -> None:
        """Write the int64 (n,) keys of a column of field ``field_index`` to ``out``: exactly
        ``schema.key(field_index, value)``."""
        if isinstance(column, Column):
            out[:] = self.schema.field_keys(field_index, column.values)[column.codes]
        else:
            self._packed.field(field_index, column, out)
