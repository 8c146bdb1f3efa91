"""The binary BYTES elements of Open Inference Protocol v2: found with array work, featurized in bulk, exactly."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.schema import criteo_schema
from server.errors import InvalidInput
from server.featurize import Featurizer, PackedRows
from server.protocols.v2 import codec
from server.types import BytesElements, to_batch


def serialize(values: list[bytes]) -> bytes:
    """BYTES elements as tritonclient writes them: a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def body(values: list[bytes], rows: int, binary: bytes | None = None) -> tuple[bytes, str]:
    cats = serialize(values) if binary is None else binary
    dense = np.arange(rows * 13, dtype="<f4").tobytes()
    inputs = [("dense", 13, "FP32", dense), ("categorical", 26, "BYTES", cats)]
    specs = [
        {"name": n, "shape": [rows, w], "datatype": t, "parameters": {"binary_data_size": len(d)}}
        for n, w, t, d in inputs
    ]
    head = orjson.dumps({"inputs": specs})
    return head + dense + cats, str(len(head))


# values that read like length prefixes themselves
tricky = st.sampled_from([b"", b"\0", b"\0\0\0\0", b"\x01\0\0\0x", b"\x04\0\0\0", b"\0\0\0\x08"])


@settings(max_examples=300, deadline=None)
@given(st.lists(tricky | st.binary(max_size=12), min_size=1, max_size=300))
def test_elements_follow_the_length_prefixes_and_pack_one_to_one(values: list[bytes]) -> None:
    raw = serialize(values)
    located = codec._elements(memoryview(raw), len(values))
    assert located is not None
    assert [raw[s : s + n] for s, n in zip(located.starts.tolist(), located.lengths.tolist(), strict=True)] == values
    packs = all(len(v) <= 8 and b"\0" not in v for v in values)
    if packs:  # the bytes, little-endian, zero-padded: one-to-one without NUL bytes
        assert located.packed is not None
        assert located.packed.tolist() == [int.from_bytes(v.ljust(8, b"\0"), "little") for v in values]
    else:
        assert located.packed is None
    assert codec._elements(memoryview(raw), len(values) + 1) is None  # fewer elements than the count
    if len(values) > 1:
        assert codec._elements(memoryview(raw), len(values) - 1) is None  # more
    assert codec._elements(memoryview(raw[:-1]), len(values)) is None  # the last one cut short
    assert codec._elements(memoryview(raw + b"\0"), len(values)) is None  # a stray byte


def _error(b: bytes, header: str) -> str:
    with pytest.raises(InvalidInput) as e:
        codec.decode_infer_request(b, header)
    return str(e.value)


def test_malformed_elements_get_the_element_by_element_messages() -> None:
    values = [f"{i:08x}".encode() for i in range(26 * 8)]
    good = serialize(values)
    last = len(good) - 12  # where the last element starts
    cases = {
        good[:-10]: f"input 'categorical': truncated BYTES element length at byte {last}",
        good[:last] + struct.pack("<I", 99) + b"12345678": (
            f"input 'categorical': BYTES element at byte {last} claims 99 bytes past the end"
        ),
    }
    for raw, message in cases.items():
        b, h = body(values, 8, raw)
        assert _error(b, h) == message  # the compiled walk refuses it; the element-by-element walk names it
    b, h = body(values, 8, good[:last])  # whole elements, one too few: the shape check says so
    request = codec.decode_infer_request(b, h)
    with pytest.raises(InvalidInput, match=r"input 'categorical': 207 values do not fill shape \[8, 26\]"):
        Featurizer(criteo_schema()).tensors_rows(request.inputs, 4096)


@pytest.mark.parametrize(
    "odd",
    [None, b"a-value-longer-than-8", b"nul\x00byte", b"\xff\xfe"],
    ids=["packable", "long value", "NUL byte", "not UTF-8"],
)
def test_binary_bytes_keys_equal_the_json_path(odd: bytes | None) -> None:
    schema = criteo_schema(3)
    featurizer = Featurizer(schema)
    rng = np.random.default_rng(1)
    values = [f"{v:08x}".encode() if v else b"" for v in rng.integers(0, 30, 26 * 10)]  # "" = missing
    if odd is not None:
        values[37] = odd
    b, h = body(values, 10)
    request = codec.decode_infer_request(b, h)
    assert isinstance(request.inputs[1].data, BytesElements)
    rows = featurizer.tensors_rows(request.inputs, 4096)
    assert isinstance(rows, PackedRows) == (odd in (None, b"\xff\xfe"))  # keys in bulk where every value packs
    expected = schema.keys_flat([v.decode("utf-8", "surrogateescape") for v in values], 10)
    got = to_batch([rows])
    np.testing.assert_array_equal(got.keys, expected)
    np.testing.assert_array_equal(got.keys, to_batch([featurizer.tensors_rows(request.inputs, 4096)]).keys)  # warm
    dense = np.arange(130, dtype=np.float32).reshape(10, 13)
    np.testing.assert_array_equal(got.dense, np.log1p(dense.astype(np.float64)).astype(np.float32))


def test_eight_ff_bytes_get_their_own_key_through_the_packed_cache() -> None:
    """0xFF x 8 packs as the cache's empty-slot value; empty slots hold key -1, so it misses, then is stored."""
    schema = criteo_schema(2)
    values = [b"\xff" * 8 if i % 26 == 0 else b"68fd1e64" for i in range(26 * 4)]
    b, h = body(values, 4)
    featurizer = Featurizer(schema)
    expected = schema.key(0, "\udcff" * 8)
    assert expected == schema.key(0, b"\xff" * 8)
    for _ in range(2):  # cold, then from the cache
        rows = featurizer.tensors_rows(codec.decode_infer_request(b, h).inputs, 4096)
        assert isinstance(rows, PackedRows)
        assert to_batch([rows]).keys[:, 0].tolist() == [expected] * 4


def test_a_shape_far_larger_than_the_body_is_bad_input_not_an_allocation() -> None:
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "categorical", "datatype": "BYTES", "shape": [10**12], "parameters": {"binary_data_size": 5}}
            ]
        }
    )
    request = codec.decode_infer_request(head + b"\x01\x00\x00\x00a", str(len(head)))  # one element found
    with pytest.raises(InvalidInput, match=r"input 'categorical': shape \[1000000000000\] is not \[batch, 26\]"):
        Featurizer(criteo_schema()).tensors_rows(request.inputs, 4096)


def test_packed_rows_cut_and_glue_like_any_rows() -> None:
    schema = criteo_schema(4)
    featurizer = Featurizer(schema)
    rng = np.random.default_rng(2)
    requests = []
    for n in (3, 5):
        values = [f"{v:08x}".encode() for v in rng.integers(0, 1000, 26 * n)]
        rows = featurizer.tensors_rows(codec.decode_infer_request(*body(values, n)).inputs, 4096)
        assert isinstance(rows, PackedRows) and len(rows) == n
        requests.append((rows, schema.keys_flat([v.decode() for v in values], n)))
    alone = [to_batch([r]) for r, _ in requests]
    for got, (_, expected) in zip(alone, requests, strict=True):
        np.testing.assert_array_equal(got.keys, expected)
    glued = to_batch([requests[0][0], requests[1][0].slice(0, 2), requests[1][0].slice(2, 5)])
    np.testing.assert_array_equal(glued.keys, np.concatenate([a.keys for a in alone]))
    np.testing.assert_array_equal(glued.dense, np.concatenate([a.dense for a in alone]))


def test_a_body_of_many_empty_elements_is_walked_in_one_pass() -> None:
    """All-zero bytes read as empty elements everywhere; the array search of before refused such bodies."""
    raw = memoryview(bytes(4 * 100_000))
    located = codec._elements(raw, 100_000)
    assert located is not None
    assert located.starts.tolist() == list(range(4, 400_004, 4)) and not located.lengths.any()
    assert located.packed is not None and not located.packed.any()  # "" packs as 0, the missing value


def test_json_bytes_data_flat_or_nested() -> None:
    def data(values: object) -> object:
        request = {"inputs": [{"name": "categorical", "shape": [2, 2], "datatype": "BYTES", "data": values}]}
        return codec.decode_infer_request(orjson.dumps(request), None).inputs[0].data

    assert data(["a", "b", "", "d"]) == data([["a", "b"], ["", "d"]]) == data([[["a"], "b"], ["", "d"]])
    assert data(["a", "b", "", "d"]) == ["a", "b", "", "d"]
    for bad in (["a", 1, "c", "d"], [["a", None], ["c", "d"]], [["a", "b"], [2, "d"]]):
        with pytest.raises(InvalidInput, match=r"input 'categorical': BYTES data must be strings, got"):
            data(bad)


def test_deeply_nested_bytes_data_is_bad_input_not_a_crash() -> None:
    # orjson parses up to 1024 levels; the old recursive flattening hit Python's recursion limit first (a 500)
    def request(data: bytes) -> bytes:
        return b'{"inputs": [{"name": "categorical", "shape": [2, 2], "datatype": "BYTES", "data": %s}]}' % data

    deep = b"[" * 1000 + b'"a", "b", "c", "d"' + b"]" * 1000  # written out: orjson.dumps stops at 255 levels
    assert codec.decode_infer_request(request(deep), None).inputs[0].data == ["a", "b", "c", "d"]
    with pytest.raises(InvalidInput, match=r"^input 'categorical': BYTES data must be strings, got number$"):
        codec.decode_infer_request(request(b'[[["a", "b"], ["c"]], [[["d", 1.5]]]]'), None)


def test_binary_output_flags_must_be_booleans() -> None:
    def binary(**request: object) -> bool:
        inputs = [{"name": "categorical", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]
        return codec.decode_infer_request(orjson.dumps({"inputs": inputs, **request}), None).binary_output

    assert binary() is False
    assert binary(parameters={"binary_data_output": True}) is True
    assert binary(outputs=[{"name": codec.OUTPUT_NAME, "parameters": {"binary_data": False}}]) is False
    # bool("false") is True: a string once asked for the binary answer it said no to
    with pytest.raises(InvalidInput, match=r"^parameters.binary_data_output: expected true or false, got string$"):
        binary(parameters={"binary_data_output": "false"})
    with pytest.raises(
        InvalidInput, match=r"^outputs\[0\].parameters.binary_data: expected true or false, got integer$"
    ):
        binary(outputs=[{"name": codec.OUTPUT_NAME, "parameters": {"binary_data": 0}}])
