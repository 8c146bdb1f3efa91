"""Python's cyclic garbage collector on a serving process: out of the way of requests.

A request makes containers by the hundred (its parsed JSON: a list and two per instance, then the batch's
lists), and the requests in flight together keep thousands of them alive. At Python's default threshold
(a collection of the youngest generation every 700 net allocations of tracked objects) the collector ran
every few requests, and each full collection walked every object start-up made: models, runtimes, the web
framework. Measured on one worker (``docs/BENCHMARKS.md``, "the garbage collector"): p99 fell from 28-31 ms to
7-11 ms, and server CPU per request by 4-11%, once those objects were frozen and the threshold raised.

- :func:`tune` (once the models are loaded): collect, then :func:`gc.freeze` every object left, so later
  collections skip them, and collect the youngest generation every ``threshold`` net allocations
  (``LMA_GC_THRESHOLD``; 0 turns the collector off).
- :func:`settle` (once a retired model version is released and its retirement task has finished, so that
  nothing holds it): frozen objects are never collected, so a retired version's objects in reference cycles
  would stay forever; unfreeze, collect, freeze again. One full collection per model update, which holds the
  GIL: 15-17 ms with the demo model loaded (74,000 tracked objects), the pause every full collection used to be.
- :func:`restore` (at shutdown): the collector as it was, for a process that embeds the app.

Nothing on the request path depends on the collector: its objects are freed by reference counting, and
cycles (a failed request's traceback) wait a little longer.
"""

from __future__ import annotations

import gc

_saved: tuple[tuple[int, int, int], bool] | None = None  # the collector's settings before the first tune()
_users = 0  # apps of this process between tune() and restore() (tests and embedders may run several)


def tune(threshold: int) -> None:
    """Freeze what is alive and set the threshold (the last app to start sets it for the process)."""
    global _saved, _users
    if _saved is None:
        _saved = gc.get_threshold(), gc.isenabled()
    _users += 1
    settle()
    if threshold == 0:
        gc.disable()
    else:
        _, older, oldest = _saved[0]
        gc.set_threshold(threshold, older, oldest)
        gc.enable()


def settle() -> None:
    """Unfreeze, collect, freeze again (a full collection). Run it where what should go is no longer referenced:
    objects alive then are frozen again, and only a later settle collects those of them that end up in cycles."""
    if _saved is None:  # not tuned: nothing frozen
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def restore() -> None:
    """The collector as it was before the first tune(), once the last app that tuned it has stopped."""
    global _saved, _users
    if _saved is None:
        return
    _users -= 1
    if _users > 0:
        return
    threshold, enabled = _saved
    _saved = None
    gc.unfreeze()
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()
    else:
        gc.disable()
