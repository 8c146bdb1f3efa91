"""Golden values of the token hash and the dense transform (models/schema.py).

These keys are part of every checkpoint and bundle: if one of them changes, every trained model
and exported artifact silently becomes wrong. A deliberate change needs a new HASH_SCHEME.
"""

import math

import numpy as np
import pytest

from models.schema import FeatureSchema, PackedKeys, avazu_schema, criteo_schema, transform_dense


@pytest.mark.parametrize(
    ("schema", "field", "value", "key"),
    [
        (criteo_schema(0), 0, "68fd1e64", 765303078632171475),
        (criteo_schema(0), 25, "9727dd16", 3398853774066253401),
        (criteo_schema(0), 1, "68fd1e64", 1580280555220987134),  # same value, other field: other key
        (criteo_schema(7), 0, "68fd1e64", 4031631776853734208),  # other seed: other key
        (criteo_schema(0), 0, None, 2791274394819915122),  # missing is a token of its own
        (avazu_schema(0), 0, "00", 2942172451814211538),
        (avazu_schema(0), 1, "1", 4051706271307105100),
        (avazu_schema(0), 2, "1005", 1329365472101739676),
    ],
)
def test_key_golden(schema: FeatureSchema, field: int, value: str | None, key: int) -> None:
    assert schema.key(field, value) == key


def test_key_equivalences() -> None:
    s = avazu_schema(0)
    assert s.key(2, 1005) == s.key(2, "1005") == 1329365472101739676  # ints hash as their decimal text
    assert s.key(2, "") == s.key(2, None)  # empty string is missing
    assert s.keys_for([["00", "1", "1005"] + [None] * (s.num_fields - 3)])[0, :3].tolist() == [
        2942172451814211538,
        4051706271307105100,
        1329365472101739676,
    ]
    assert 0 <= s.key(5, "x" * 1000) < 2**62


def test_transform_dense_edge_cases() -> None:
    raw = np.array([[np.nan, -3.0, 0.0, 1.0, np.inf, 1e30, 2.5]])
    out = transform_dense(raw)
    assert out.dtype == np.float32 and out.shape == (1, 7)
    expected = np.array([[0.0, 0.0, 0.0, math.log1p(1.0), 0.0, math.log1p(1e30), math.log1p(2.5)]], np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 3] == np.float32(0.6931472)
    assert transform_dense(np.zeros((0, 13))).shape == (0, 13)


def _packed(values: list[bytes]) -> np.ndarray:
    """PackedKeys' packing: the bytes little-endian, zero-padded to 8."""
    return np.array([int.from_bytes(v.ljust(8, b"\0"), "little") for v in values], np.uint64)


@pytest.mark.parametrize("slot_bits", [2, 16])  # two bits: one bucket per field, so nearly every value collides
def test_packed_keys_are_the_schema_keys(slot_bits: int) -> None:
    schema = criteo_schema(7)
    rng = np.random.default_rng(0)
    words = [b"", b"1005", b"68fd1e64", b"caf\xc3\xa9", b"\xff\xfe", *(f"{v:08x}".encode() for v in range(50))]
    values = [[words[i] for i in rng.integers(0, len(words), schema.num_fields)] for _ in range(40)]
    expected = [
        [schema.key(f, v.decode("utf-8", "surrogateescape") or None) for f, v in enumerate(row)] for row in values
    ]
    cache = PackedKeys(schema, slot_bits)
    packed = _packed([v for row in values for v in row]).reshape(40, schema.num_fields)
    for _ in range(2):  # cold, then warm (or evicted, at one bit)
        assert cache.rows(packed).tolist() == expected
        assert [cache.field(f, packed[:, f]).tolist() for f in range(schema.num_fields)] == [
            [row[f] for row in expected] for f in range(schema.num_fields)
        ]
    assert schema.key(3, "\udcff\udcfe") == schema.key(3, b"\xff\xfe")  # surrogateescape: the bytes as sent


def test_packed_keys_refuse_a_bad_table_size() -> None:
    with pytest.raises(ValueError, match=r"slot_bits must be in \[2, 30\], got 1"):
        PackedKeys(criteo_schema(), 1)


def test_missing_values_do_not_depend_on_the_cache() -> None:
    """Another thread may find a field's cache between its clear and its refill: None and "" stay missing."""
    schema = criteo_schema(1)
    missing = schema.key(0, None)
    schema._hashers[0].cache.clear()  # as a full cache does, before it puts the missing values back
    assert schema.key(0, None) == schema.key(0, "") == missing
    assert "" not in schema._hashers[0].cache  # nothing was hashed and stored for them meanwhile
    assert schema.keys_flat([None, ""] + ["x"] * 24, 1)[0, 0] == missing
