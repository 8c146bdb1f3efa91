"""No input makes the server answer 500 (or stop answering): hypothesis throws JSON at every body-taking route."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALLOWED = {200, 404, 413, 422}  # native routes
ALLOWED_V2 = {200, 400, 404, 413}  # Open Inference Protocol v2: bad input is 400, errors are {"error": ...}
NAMES = ["I1", "I13", "C1", "C26", "dense", "categorical", "entity", "instances", "inputs", "name", "shape", "datatype"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)
row_values = st.lists(scalars, min_size=0, max_size=30)
instances = st.fixed_dictionaries(
    {},
    optional={
        "dense": row_values | st.dictionaries(st.sampled_from(["I1", "I2", "I13", "I99"]), scalars),
        "categorical": row_values | st.dictionaries(st.sampled_from(["C1", "C2", "C26", "C0"]), scalars),
        "entity": scalars,
    },
)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["dense", "categorical", "keys"]),
        "shape": st.lists(st.integers(-1, 30), max_size=3),
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", 3]),
        "data": json_values,
    },
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), scalars)},
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(client: TestClient, url: str, body: Any) -> None:
    r = client.post(url, content=json.dumps(body).encode())
    v2 = url.startswith("/v2/")
    assert r.status_code in (ALLOWED_V2 if v2 else ALLOWED), (r.status_code, r.text)
    assert r.headers["x-request-id"]
    if r.status_code != 200:
        assert set(r.json()) == ({"error"} if v2 else {"error", "kind"})


@FUZZ
@given(body=json_values)
def test_any_json_body(app_client: TestClient, body: Any) -> None:
    check(app_client, "/v1/models/criteo:predict", body)
    check(app_client, "/v2/models/criteo/infer", body)


@FUZZ
@given(body=st.lists(instances, min_size=1, max_size=4))
def test_near_valid_instances(app_client: TestClient, body: list[dict[str, Any]]) -> None:
    check(app_client, "/v1/models/criteo:predict", {"instances": body})
    check(app_client, "/v1/predict", {"instances": body})


@FUZZ
@given(inputs=st.lists(tensor, min_size=1, max_size=3), outputs=st.none() | st.lists(json_values, max_size=2))
def test_near_valid_tensors(app_client: TestClient, inputs: list[dict[str, Any]], outputs: Any) -> None:
    check(app_client, "/v2/models/criteo/infer", {"inputs": inputs, "outputs": outputs})


@FUZZ
@given(
    raw=st.binary(max_size=64), header=st.none() | st.integers(-5, 80).map(str) | st.text("0123456789²x -", max_size=3)
)
def test_raw_bytes_with_binary_header(app_client: TestClient, raw: bytes, header: str | None) -> None:
    headers = {} if header is None else {"inference-header-content-length": header.encode("latin-1")}
    r = app_client.post("/v2/models/criteo/infer", content=raw, headers=headers)
    assert r.status_code in ALLOWED_V2, (r.status_code, r.text)
