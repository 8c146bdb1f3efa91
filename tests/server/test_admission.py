"""Admission's own estimates: the event loop's lag and the occupancy of the process (Little's law)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.admission import LoopLag, Occupancy


def test_occupancy_measures_busy_time_per_finished_request() -> None:
    occ = Occupancy(window_s=0.1, weight=1.0)
    assert occ.wait_s() == 0.0  # nothing measured, nothing here
    # 4 requests overlapping from t=0: busy 0..0.2, four finish -> 0.05 s of busy time each
    for _ in range(4):
        occ.enter(0.0)
    occ.leave(0.05)
    occ.leave(0.1)  # the window (0.1 s) is over: a sample = 0.1 s busy / 2 finished
    assert occ.service_s == pytest.approx(0.05) and occ.in_system == 2
    assert occ.wait_s() == pytest.approx(2 * 0.05)  # the two still here take that long to get out of the way
    occ.leave(0.15)
    occ.leave(0.2)  # idle again: the second window saw 0.1 s busy, 2 finished
    assert occ.service_s == pytest.approx(0.05) and occ.wait_s() == 0.0


def test_occupancy_averages_windows() -> None:
    occ = Occupancy(window_s=0.01, weight=0.5)
    occ.enter(0.0)
    occ.leave(0.02)  # first window: 0.02 s per request, taken as is
    assert occ.service_s == pytest.approx(0.02)
    occ.enter(1.0)
    occ.leave(1.04)  # 0.04 s: averaged half and half
    assert occ.service_s == pytest.approx(0.03)


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
