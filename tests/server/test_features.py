"""The in-memory feature store and how stored features merge into instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.schema import criteo_schema
from server.errors import EntityNotFound, InvalidInput
from server.features import FeatureStore, InMemoryFeatureStore, open_feature_store
from server.featurize import Featurizer
from server.settings import Settings


async def test_store_from_json_and_csv(tmp_path: Path) -> None:
    j = tmp_path / "f.json"
    j.write_text('[{"entity": "u1", "I1": 2, "C1": "a"}, {"entity": "u2", "C2": 5}]')
    c = tmp_path / "f.csv"
    c.write_text("entity,I1,C1,C2\nu1,2,a,\nu2,,,5\n")
    for path in (j, c):
        store = InMemoryFeatureStore.from_file(path)
        assert isinstance(store, FeatureStore) and store.available and len(store) == 2
        u1, u2, nobody = await store.fetch(["u1", "u2", "u3"])
        assert nobody is None
        assert {k: str(v) for k, v in u1.items()} == {"I1": "2", "C1": "a"}  # CSV values are text
        assert {k: str(v) for k, v in u2.items()} == {"C2": "5"}  # empty cells are missing


def test_bad_store_files(tmp_path: Path) -> None:
    c = tmp_path / "f.csv"
    c.write_text("user,I1\nu1,2\n")
    with pytest.raises(ValueError, match="needs a header row with an 'entity' column"):
        InMemoryFeatureStore.from_file(c)
    j = tmp_path / "f.json"
    j.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected"):
        InMemoryFeatureStore.from_file(j)


def test_settings_choose_the_store(tmp_path: Path) -> None:
    assert isinstance(open_feature_store(Settings(model_dir=tmp_path)), InMemoryFeatureStore)


def test_merge_fills_only_what_is_missing() -> None:
    f = Featurizer(criteo_schema())
    parsed = f.parse_instances(
        [{"dense": {"I1": 1.0}, "categorical": {"C1": "mine"}, "entity": "u"},
         {"entity": "v", "missing_entity": "defaults"}, {}], 10,
    )  # fmt: skip
    assert parsed.entities == ["u", "v", None]
    stored = {"I1": 9, "I2": "2.5", "C1": "theirs", "C2": b"bytes", "X": "ignored"}
    f.merge_stored(parsed, [stored, None, None])
    dense, categorical = parsed.rows.dense, parsed.rows.categorical  # flat, row-major: 13 and 26 per instance
    assert dense[:3] == [1.0, 2.5, None]  # a missing raw value stays None until the batch's np.array
    assert categorical[:3] == ["mine", "bytes", None]
    with pytest.raises(InvalidInput, match=r"instances\[1\]: stored feature I3 of entity 'v' is not a number: 'abc'"):
        f.merge_stored(parsed, [stored, {"I3": "abc"}, None])
    with pytest.raises(InvalidInput, match=r"instances\[1\]: stored feature C3 of entity 'v' has type number"):
        f.merge_stored(parsed, [stored, {"C3": 1.5}, None])


def test_an_entity_with_nothing_stored_is_an_error_unless_defaults_are_asked_for() -> None:
    f = Featurizer(criteo_schema())
    parsed = f.parse_instances([{"entity": "u"}, {"entity": "v", "missing_entity": "defaults"}], 10)
    with pytest.raises(EntityNotFound, match=r"instances\[0\]\.entity: nothing stored for entity 'u'") as e:
        f.merge_stored(parsed, [None, None])
    assert e.value.status == 404
    parsed = f.parse_instances(
        [{"entity": "u", "categorical": {"C1": "x"}}, {"entity": "v", "missing_entity": "defaults"}], 10
    )
    f.merge_stored(parsed, [{"C2": "y"}, None])  # v is scored with what it carries
    assert parsed.rows.categorical[26:] == [None] * 26
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.missing_entity: expected one of \['error', 'defaults'\]"):
        f.parse_instances([{"entity": "u", "missing_entity": "zeros"}], 10)
