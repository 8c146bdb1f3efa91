"""loadtest.payloads: the v2 bodies, JSON and binary, carry the same tensors (decoded by the server's own codec)."""

from __future__ import annotations

import numpy as np
import orjson

from loadtest.payloads import synthetic_rows, v2_binary_body, v2_body
from server.protocols.v2.codec import decode_infer_request
from server.types import BytesElements


def test_v2_binary_body_carries_the_json_bodys_tensors() -> None:
    rows = synthetic_rows(40, seed=3).rows[:7]
    body, head = v2_binary_body(rows)
    binary = decode_infer_request(body, str(head))
    plain = decode_infer_request(v2_body(rows), None)
    heads = [[(t.name, t.datatype, t.shape) for t in r.inputs] for r in (binary, plain)]
    assert heads[0] == heads[1]
    np.testing.assert_array_equal(binary.inputs[0].data, plain.inputs[0].data)  # dense FP32, missing sent as 0
    cat = binary.inputs[1].data
    assert isinstance(cat, BytesElements)  # 7 x 26 elements: found with array work
    assert cat.strings() == plain.inputs[1].data
    assert orjson.loads(body[:head])["outputs"] == [{"name": "probability"}]
