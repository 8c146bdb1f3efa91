"""models/jit.py: kernels cache their machine code on disk, and still compile where nothing is writable."""

import logging
from pathlib import Path

import numba.core.caching
import pytest

from models.jit import kernel

ROOT = Path(__file__).resolve().parents[2]


def _add_one(x: int) -> int:
    return x + 1


def test_a_kernel_is_cached_on_disk_where_it_can_be() -> None:
    k = kernel(_add_one)
    assert k(41) == 42
    assert isinstance(k._cache, numba.core.caching.FunctionCache)  # type: ignore[attr-defined]


def test_a_kernel_compiles_in_the_process_where_no_cache_location_is_writable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only image without NUMBA_CACHE_DIR: Numba finds no locator and refuses caching at decoration."""
    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator available"):  # what numba itself does
        numba.njit(cache=True)(_add_one)
    with caplog.at_level(logging.INFO, "lma.jit"):
        k = kernel(_add_one)
    assert k(41) == 42
    assert isinstance(k._cache, numba.core.caching.NullCache)  # type: ignore[attr-defined]
    assert "_add_one: compiled in this process, not cached (cannot cache function" in caplog.text
