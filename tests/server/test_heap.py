"""The garbage collector on a serving process: frozen after start-up, a higher threshold, re-settled on updates."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server import heap
from server.app import build_app
from tests.helpers.serving import ADMIN_TOKEN, Bundles, make_repo, settings_for


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # only the cyclic collector can free it


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    before = gc.get_threshold(), gc.isenabled()
    yield
    heap.restore()
    assert (gc.get_threshold(), gc.isenabled()) == before and gc.get_freeze_count() == 0


def test_tune_freezes_what_is_alive_and_restore_puts_the_collector_back() -> None:
    default = gc.get_threshold()
    heap.tune(12_345)
    assert gc.get_threshold() == (12_345, *default[1:]) and gc.isenabled()
    assert gc.get_freeze_count() > 0
    heap.restore()
    assert gc.get_threshold() == default and gc.get_freeze_count() == 0
    heap.tune(0)
    assert not gc.isenabled()
    heap.restore()
    assert gc.isenabled()
    heap.settle()  # not tuned: freezes nothing
    assert gc.get_freeze_count() == 0


def test_two_apps_in_one_process_restore_the_collector_when_the_last_stops() -> None:
    default = gc.get_threshold()
    heap.tune(0)
    heap.tune(5_000)  # the last to start sets it
    assert gc.isenabled() and gc.get_threshold()[0] == 5_000
    heap.restore()
    assert gc.get_threshold()[0] == 5_000 and gc.get_freeze_count() > 0  # the other app still serves
    heap.restore()
    assert gc.get_threshold() == default and gc.isenabled() and gc.get_freeze_count() == 0


def test_settle_collects_cycles_that_were_frozen_alive() -> None:
    obj = _Cycle()
    alive = weakref.ref(obj)
    heap.tune(10_000)
    del obj
    gc.collect()
    assert alive() is not None  # frozen: no collection looks at it
    heap.settle()
    assert alive() is None


def test_the_server_tunes_the_collector_and_a_model_update_collects_what_it_froze(
    bundles: Bundles, tmp_path: Path
) -> None:
    default = gc.get_threshold()
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    obj = _Cycle()
    alive = weakref.ref(obj)
    app = build_app(settings_for(repo, gc_threshold=5_000))
    with TestClient(app) as client:
        assert gc.get_threshold()[0] == 5_000 and gc.get_freeze_count() > 0
        del obj  # garbage now, but frozen with everything else start-up left alive
        # and version 1 itself in a cycle: its batcher (frozen) and an object made now
        batcher = app.state.engine.registry.get("criteo").batcher
        batcher.test_cycle = _Cycle()
        batcher.test_cycle.owner = batcher
        retired = weakref.ref(batcher)
        del batcher
        gc.collect()
        assert alive() is not None and retired() is not None
        r = client.post(
            "/v1/models/criteo:reload",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            json={"path": str(bundles.criteo_v2.path)},
        )
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
        deadline = time.monotonic() + 30
        while retired() is not None and time.monotonic() < deadline:  # version 1 is released in the background
            time.sleep(0.05)
        assert alive() is None and retired() is None
    assert gc.get_threshold() == default and gc.get_freeze_count() == 0
