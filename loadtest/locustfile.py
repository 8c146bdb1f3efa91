"""Locust users for the LMA CTR server (DESIGN section 9).

Headless, bounded in time, on loopback (one user class by name, or all of them by weight)::

    locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 20s --host http://127.0.0.1:8000 SingleSampleUser

User classes:

- ``SingleSampleUser``: native API, one instance per request;
- ``BatchUser``: native API, ``LMA_LOADTEST_BATCH`` (32) instances per request;
- ``V2InferUser``: Open Inference Protocol v2 ``/v2/models/{name}/infer``, categorical values as BYTES;
- ``FeatureStoreUser``: one instance per request carrying an ``entity`` key and half of the features; the
  other half comes from the server's feature store (see ``loadtest.payloads.entity_features``).

Bodies are rows of ``LMA_LOADTEST_DATA`` (format ``LMA_LOADTEST_FORMAT``) or synthetic Criteo-shaped rows,
encoded once per process before the first request; the other settings are read by
``loadtest.payloads.LoadTestConfig.from_env``. Every response is checked: status 200 and one probability
in [0, 1] per instance sent, anything else counts as a failure with the status and the server's message.
"""

from __future__ import annotations

import functools
import random
from typing import Any, ClassVar

import orjson
from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.exception import StopUser

from loadtest.payloads import BodyPool, LoadTestConfig, Pools, native_response_problem, v2_response_problem

CONFIG = LoadTestConfig.from_env()
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


@functools.cache
def pools() -> Pools:
    """Bodies of every user class, built once per locust process."""
    return CONFIG.build_pools()


@events.init.add_listener
def _encode_bodies_before_the_test(**_: Any) -> None:
    pools()  # encode at start-up, so that no user's first request pays for it


class _LmaUser(FastHttpUser):
    """Replays one pool of pre-encoded bodies against one route and checks every response."""

    abstract = True
    wait_time = constant_throughput(CONFIG.rate) if CONFIG.rate else constant(0)
    pool_name: ClassVar[str]
    request_name: ClassVar[str]

    def on_start(self) -> None:
        pool: BodyPool = getattr(pools(), self.pool_name)
        self.samples = pool.samples
        self.bodies = pool.cursor(random.randrange(len(pool)))  # users start at different rows
        self.path = self.route(CONFIG.model or self.default_model())

    def route(self, model: str | None) -> str:
        return f"/v1/models/{model}:predict" if model else "/v1/predict"

    def default_model(self) -> str | None:
        return None

    def check(self, body: Any) -> str | None:
        """Why a 200 response body is wrong, or None."""
        return native_response_problem(body, self.samples)

    @task
    def predict(self) -> None:
        body = next(self.bodies)
        # geventhttpclient sends bytes as they are; locust's annotation only names str and dict
        with self.client.post(
            self.path,
            data=body,  # type: ignore[arg-type]
            headers=JSON_HEADERS,
            name=self.request_name,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                problem = self.check(orjson.loads(resp.content))
            except orjson.JSONDecodeError:
                problem = "response is not JSON"
            if problem:
                resp.failure(problem)


class _NamedModelUser(_LmaUser):
    """A user of a route that needs the model's name: LMA_LOADTEST_MODEL, else the first one the server lists."""

    abstract = True

    def default_model(self) -> str | None:
        with self.client.get("/v1/models", name="GET /v1/models", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}; set LMA_LOADTEST_MODEL")
                raise StopUser()
            models = orjson.loads(resp.content).get("models") or []
            if not models:
                resp.failure("the server has no model loaded")
                raise StopUser()
            return str(models[0]["name"])


class SingleSampleUser(_LmaUser):
    pool_name = "native_single"
    request_name = "native single"


class BatchUser(_LmaUser):
    pool_name = "native_batch"
    request_name = "native batch"


class V2InferUser(_NamedModelUser):
    pool_name = "v2"
    request_name = "v2 infer"

    def route(self, model: str | None) -> str:
        return f"/v2/models/{model}/infer"

    def check(self, body: Any) -> str | None:
        return v2_response_problem(body, self.samples)


class FeatureStoreUser(_LmaUser):
    pool_name = "feature_store"
    request_name = "feature store"
