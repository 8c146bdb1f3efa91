"""Native instances: the whole-request check of canonical instances agrees with the instance-by-instance one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.schema import FeatureSchema, transform_dense
from server.errors import InvalidInput
from server.featurize import Featurizer, RawRows

SCHEMA = FeatureSchema(("I1", "I2"), ("C1", "C2", "C3"), hash_seed=7)

values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=9), st.just(""),
)  # fmt: skip
rows = st.lists(values, min_size=1, max_size=4)
canonical_like = st.fixed_dictionaries({"dense": rows, "categorical": rows}) | st.fixed_dictionaries(
    {"categorical": rows, "dense": rows}
)
# mostly the right lengths, so that most examples reach the value checks
full_lists = {
    "dense": st.lists(values, min_size=2, max_size=2),
    "categorical": st.lists(values, min_size=3, max_size=3),
}
right_lengths = st.fixed_dictionaries(full_lists)
with_entity = st.fixed_dictionaries(
    full_lists, optional={"entity": st.sampled_from(["u", ""]), "missing_entity": st.sampled_from(["defaults", "x"])}
)
instance = right_lengths | canonical_like | with_entity | st.fixed_dictionaries({"dense": rows}) | st.just({})


class _InstanceLoopOnly(Featurizer):
    def _canonical(self, instances: list[Any]) -> None:
        return None


def outcome(f: Featurizer, instances: list[Any]) -> tuple[str, Any]:
    try:
        parsed = f.parse_instances(instances, 100)
    except InvalidInput as e:
        return "error", str(e)
    batch = RawRows.merge([parsed.rows])
    graph = batch.dense.tobytes(), batch.keys.tobytes()
    return "rows", (parsed.rows.dense, parsed.rows.categorical, *graph, parsed.entities, parsed.defaults_ok)


@settings(max_examples=300, deadline=None)
@given(instances=st.lists(instance, min_size=1, max_size=4))
def test_the_whole_request_check_gives_what_the_instance_loop_gives(instances: list[dict[str, Any]]) -> None:
    fast, slow = outcome(Featurizer(SCHEMA), instances), outcome(_InstanceLoopOnly(SCHEMA), instances)
    assert fast == slow  # the same message, or the same raw values (the very objects: NaN too) and graph inputs


def test_canonical_instances_are_checked_at_once_and_keyed_exactly() -> None:
    f = Featurizer(SCHEMA)
    instances = [
        {"dense": [1.5, None], "categorical": ["a", 1005, None]},
        {"categorical": ["", "1005", "b"], "dense": [3, -2.0]},
    ]
    rows = f._canonical(instances)
    assert rows is not None
    assert rows.dense == [1.5, None, 3, -2.0] and rows.categorical == ["a", 1005, None, "", "1005", "b"]
    batch = RawRows.merge([rows])
    np.testing.assert_array_equal(batch.dense, transform_dense(np.array([[1.5, 0.0], [3.0, 0.0]])))
    # 1005 and "1005" are one token, and so are None and "" (missing)
    expected = np.array([[SCHEMA.key(j, v) for j, v in enumerate(r)] for r in (["a", "1005", None], [None, 1005, "b"])])
    np.testing.assert_array_equal(batch.keys, expected)


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([{"dense": [1.0, True], "categorical": ["a", "b", "c"]}],
         "instances[0].dense[1] (I2): expected a number or null, got boolean"),
        ([{"dense": [1.0, 2.0], "categorical": ["a", "b", "c"]}, {"dense": [1.0, 2.0], "categorical": ["a", 1.5, "c"]}],
         "instances[1].categorical[1] (C2): expected a string, an integer or null, got number"),
        ([{"dense": [1.0, 2.0], "categorical": ["a", "b"]}],
         "instances[0].categorical: expected 3 values (C1..C3), got 2"),
        ([{"dense": [1.0, 2.0], "categorical": ["a", "b", "c"]}, {"dense": [1.0, 2.0], "entity": ""}],
         "instances[1].entity: expected a non-empty string, got string"),
    ],
)  # fmt: skip
def test_a_request_the_whole_request_check_refuses_gets_the_instance_loops_message(
    instances: list[dict[str, Any]], message: str
) -> None:
    f = Featurizer(SCHEMA)
    assert f._canonical(instances) is None
    with pytest.raises(InvalidInput) as e:
        f.parse_instances(instances, 100)
    assert str(e.value) == message
