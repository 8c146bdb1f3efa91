"""Admission's own estimates: the event loop's lag and the occupancy of the process (Little's law)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.admission import LoopLag, Occupancy


def test_occupancy_limit_grows_while_latency_is_on_target_and_shrinks_when_not() -> None:
    occ = Occupancy(target_s=0.05, window_s=0.1, weight=1.0, limit=10, min_limit=4)
    assert occ.admits() and occ.wait_s() == 0.0  # empty: nothing ahead
    for _ in range(10):
        occ.enter(0.0)
    assert not occ.admits()  # 10 in the process: at the limit
    assert occ.wait_s() == 0.0  # nothing measured yet
    occ.leave(0.05, latency_s=0.01)
    occ.leave(0.1, latency_s=0.03)  # window over: mean 20 ms, within the 50 ms target
    assert occ.latency_s == pytest.approx(0.02) and occ.limit == 11  # up by a tenth, at least one
    assert occ.admits() and occ.wait_s() == pytest.approx(0.02)  # 8 here: they take about 20 ms
    occ.leave(0.25, latency_s=0.2)  # the next window: 200 ms, over the target
    assert occ.limit == pytest.approx(8.8) and occ.latency_s == pytest.approx(0.2)  # down by a fifth
    for t in range(20):
        occ.leave(1.0 + t, latency_s=1.0)
        occ.enter(1.0 + t)
    assert occ.limit == 4  # never below the floor


def test_occupancy_never_locks_out() -> None:
    occ = Occupancy(target_s=0.05, window_s=0.1, weight=1.0, limit=4, min_limit=4)
    occ.enter(0.0)
    occ.leave(0.2, latency_s=5.0)  # a terrible window...
    assert occ.latency_s == 5.0 and occ.limit == 4
    assert occ.wait_s() == 0.0 and occ.admits()  # ...but nothing is ahead now: the next request is admitted


async def test_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag(interval_s=0.005)
    lag.start()
    await asyncio.sleep(0.02)
    time.sleep(0.1)  # the loop is blocked: the lag task wakes up late
    await asyncio.sleep(0.006)
    assert lag.lag_s > 0.04
    await asyncio.sleep(0.2)  # on time again: the lag it remembers halves with every interval
    assert lag.lag_s < 0.01
    await lag.close()
