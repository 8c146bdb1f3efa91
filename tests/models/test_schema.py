"""Golden values of the token hash and the dense transform (models/schema.py).

These keys are part of every checkpoint and bundle: if one of them changes, every trained model
and exported artifact silently becomes wrong. A deliberate change needs a new HASH_SCHEME.
"""

import math

import numpy as np
import pytest

from models.schema import FeatureSchema, avazu_schema, criteo_schema, transform_dense


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
