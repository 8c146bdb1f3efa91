"""The native body scan (server/protocols/native/codec.py) reads exactly what orjson + the instance checks read.

Every body either gets the very graph inputs and raw values the Python path gives, or is left to that path
(the scan answers None), which then names what is wrong. Bodies are written as text here, so that
whitespace, key order, number spellings, escapes and broken JSON all occur.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.payloads import native_body, synthetic_rows
from models.schema import FeatureSchema, criteo_schema
from server.errors import InvalidInput, PayloadTooLarge
from server.featurize import Featurizer, PackedRows, RawRows, parse_json_object
from server.protocols.native.codec import scan_instances
from server.protocols.native.schemas import PREDICT_KEYS

SCHEMA = FeatureSchema(("I1", "I2"), ("C1", "C2", "C3"), hash_seed=7)
MAX = 6

ws = st.sampled_from(["", "", " ", "\n", "\t ", "\r\n  "])
digits = st.text("0123456789", min_size=1, max_size=18)
integer_text = st.one_of(
    st.integers(-(10**9), 10**9).map(str), st.just("-0"), st.just("0"), digits.map(lambda d: d.lstrip("0") or "0")
)
number_text = st.builds(
    lambda sign, whole, frac, exp: sign + whole + frac + exp,
    st.sampled_from(["", "", "-"]),
    digits.map(lambda d: d.lstrip("0") or "0") | st.sampled_from(["01", "00"]),  # leading zeros: not JSON
    st.sampled_from(["", ""]) | digits.map(lambda d: "." + d) | st.just("."),
    st.sampled_from(["", "", ""])
    | st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), digits)
    | st.just("e"),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
dense_text = st.one_of(
    st.just("null"),
    integer_text,
    number_text,
    finite.map(lambda f: orjson.dumps(f).decode()),
    st.sampled_from(["true", '"1"', "NaN", "-", "+1", ".5", "1e400", "[]"]),
)
ascii_token = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=9)
categorical_text = st.one_of(
    st.just("null"),
    st.just('""'),
    ascii_token.map(lambda t: orjson.dumps(t).decode()),  # with \" and \\ escapes where the text has them
    st.text(max_size=9).map(lambda t: orjson.dumps(t).decode()),  # any text: non-ASCII, control escapes
    integer_text,
    st.integers(-(2**63), 2**63 - 1).map(str),
    finite.map(lambda f: orjson.dumps(f).decode()),
    st.sampled_from(["true", "false", "1.0", "-0", "[1]", '"\\u0041"']),
)


def array(values: st.SearchStrategy[str], width: int) -> st.SearchStrategy[str]:
    sizes = st.sampled_from([width, width, width, width - 1, width + 1])
    return sizes.flatmap(lambda n: st.lists(st.tuples(ws, values, ws), min_size=max(n, 0), max_size=max(n, 0))).map(
        lambda items: "[" + ",".join(a + v + b for a, v, b in items) + "]"
    )


def member(key: str, value: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda a, b, c, v: f'{a}"{key}"{b}:{c}{v}', ws, ws, ws, value)


dense_member = member("dense", array(dense_text, 2) | st.sampled_from(["null", '{"I1": 1}']))
categorical_member = member("categorical", array(categorical_text, 3))
extra_member = member("entity", st.just('"u"')) | member("missing_entity", st.just('"defaults"'))
instance = (
    st.lists(st.sampled_from(["dense", "categorical", "dense", "categorical", "extra"]), min_size=0, max_size=3)
    .flatmap(
        lambda keys: st.tuples(
            *[{"dense": dense_member, "categorical": categorical_member, "extra": extra_member}[k] for k in keys]
        )
    )
    .map(lambda members: "{" + ",".join(members) + "}")
)
canonical_instance = (
    st.permutations([dense_member, categorical_member])
    .flatmap(lambda ms: st.tuples(*ms))
    .map(lambda members: "{" + ",".join(members) + "}")
)


def body(instances: st.SearchStrategy[str], max_size: int = MAX + 1) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda a, b, c, d, items, e, f, tail: (
            f'{a}{{{b}"instances"{c}:{d}[' + ",".join(items) + f"]{e}}}{f}{tail}"
        ).encode(),
        ws, ws, ws, ws, st.lists(instances, min_size=0, max_size=max_size), ws, ws,
        st.sampled_from(["", "", "", "", " ", "}", ",", "x"]),
    )  # fmt: skip


def _plain(values: st.SearchStrategy[str], width: int) -> st.SearchStrategy[str]:
    return st.lists(st.tuples(ws, values, ws), min_size=width, max_size=width).map(
        lambda items: "[" + ",".join(a + v + b for a, v, b in items) + "]"
    )


plain_dense = st.one_of(st.just("null"), st.integers(-(10**9), 10**9).map(str), st.just("-0"),
                        st.floats(-1e6, 1e6).map(lambda f: orjson.dumps(f).decode()),
                        st.sampled_from(["1e3", "2.5E-3", "-0.0", "12.50e+2", "0e0"]))  # fmt: skip
plain_token = st.one_of(
    st.just("null"), st.just('""'), st.integers(-(10**6), 10**7).map(str),
    st.text("0123456789abcdef", max_size=8).map(lambda t: f'"{t}"'),
    st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\'), max_size=8).map(
        lambda t: f'"{t}"'
    ),
)  # fmt: skip
plain_instance = (
    st.permutations([member("dense", _plain(plain_dense, 2)), member("categorical", _plain(plain_token, 3))])
    .flatmap(lambda ms: st.tuples(*ms))
    .map(lambda members: "{" + ",".join(members) + "}")
)


any_instance = plain_instance | instance | canonical_instance


def python_path(f: Featurizer, data: bytes) -> tuple[str, Any]:
    """What orjson and the instance checks make of a body: the error message, or the raw rows and graph inputs."""
    try:
        parsed = f.parse_instances(parse_json_object(data, PREDICT_KEYS, "instances")["instances"], MAX)
    except (InvalidInput, PayloadTooLarge) as e:
        return "error", str(e)
    assert isinstance(parsed.rows, RawRows)
    return "rows", (parsed.rows, RawRows.merge([parsed.rows]), parsed.entities)


def assert_same(scanned: tuple[np.ndarray, np.ndarray], rows: RawRows, f: Featurizer) -> None:
    dense, packed = scanned
    raw = np.array(rows.dense, dtype=np.float64).reshape(rows.size, f.num_dense)
    assert dense.shape == raw.shape and packed.shape == (rows.size, f.num_fields)
    assert np.array_equal(dense, raw, equal_nan=True)
    assert np.array_equal(np.signbit(dense[~np.isnan(dense)]), np.signbit(raw[~np.isnan(raw)]))  # -0.0 stays -0.0
    mine = PackedRows.merge([PackedRows(f, rows.size, dense, packed)])
    theirs = RawRows.merge([rows])
    assert mine.dense.tobytes() == theirs.dense.tobytes()
    assert mine.keys.tolist() == theirs.keys.tolist()


@settings(max_examples=600, deadline=None)
@given(data=body(any_instance))
def test_the_scan_takes_only_what_the_python_path_accepts_and_reads_the_same(data: bytes) -> None:
    f = Featurizer(SCHEMA)
    scanned = scan_instances(data, f.num_dense, f.num_fields, MAX)
    kind, got = python_path(f, data)
    if scanned is not None:
        assert kind == "rows", got  # never a body that the Python path refuses
        rows, _, entities = got
        assert entities is None
        assert_same(scanned, rows, f)
    if kind == "rows":  # the method the route calls: the same rows (a refused body: the next test)
        via_server = f.parse_body(data, MAX)
        assert isinstance(via_server.rows, PackedRows if scanned is not None else RawRows)
        assert len(via_server) == got[0].size


@settings(max_examples=300, deadline=None)
@given(data=body(any_instance))
def test_a_body_the_python_path_refuses_has_the_same_message_through_parse_body(data: bytes) -> None:
    f = Featurizer(SCHEMA)
    kind, got = python_path(f, data)
    if kind == "rows":
        return
    with pytest.raises((InvalidInput, PayloadTooLarge)) as e:
        f.parse_body(data, MAX)
    assert str(e.value) == got


@settings(max_examples=300, deadline=None)
@given(
    data=st.builds(
        lambda a, items, b: (f'{a}{{"instances":[' + ",".join(items) + f"]}}{b}").encode(),
        ws,
        st.lists(plain_instance, min_size=1, max_size=MAX),
        ws,
    )
)
def test_the_scan_reads_every_canonical_body_of_common_values(data: bytes) -> None:
    """Not vacuous: the common spellings of values (Criteo's and those of JSON encoders) all take the scan."""
    f = Featurizer(SCHEMA)
    scanned = scan_instances(data, f.num_dense, f.num_fields, MAX)
    assert scanned is not None, data
    kind, got = python_path(f, data)
    assert kind == "rows", got
    assert_same(scanned, got[0], f)
    assert isinstance(f.parse_body(data, MAX).rows, PackedRows)


def test_the_load_tests_bodies_take_the_scan_with_the_criteo_schema() -> None:
    f = Featurizer(criteo_schema())
    rows = synthetic_rows(256, seed=3).rows
    for start in range(0, 256, 32):
        data = native_body(rows[start : start + 32])
        scanned = scan_instances(data, f.num_dense, f.num_fields, 1000)
        assert scanned is not None
        parsed = f.parse_instances(parse_json_object(data, PREDICT_KEYS, "instances")["instances"], 1000)
        assert isinstance(parsed.rows, RawRows)
        assert_same(scanned, parsed.rows, f)


@pytest.mark.parametrize("count, expected", [(MAX, MAX), (MAX + 1, None)])
def test_more_instances_than_the_limit_are_left_to_the_message_naming_it(count: int, expected: int | None) -> None:
    f = Featurizer(SCHEMA)
    data = orjson.dumps({"instances": [{"dense": [1, 2], "categorical": ["a", "b", "c"]}] * count})
    scanned = scan_instances(data, f.num_dense, f.num_fields, MAX)
    assert (None if scanned is None else len(scanned[0])) == expected
    if expected is None:
        with pytest.raises(PayloadTooLarge, match=f"instances: {count} instances, more than the limit of {MAX}"):
            f.parse_body(data, MAX)
