"""models/jit.py: kernels cache their machine code on disk, and still compile where nothing is writable."""

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numba.core.caching
import numpy as np
import pytest

from models.jit import inline, kernel
from models.schema import _MULTIPLIER, FeatureSchema, PackedKeys, _texts, criteo_schema

ROOT = Path(__file__).resolve().parents[2]


def _add_one(x: int) -> int:
    return x + 1


def _add_two(x: int) -> int:
    return _plus_one(_plus_one(x))


def _one_more(x: int) -> int:
    return x + 1


_plus_one = inline(_one_more)


def test_a_kernel_compiles_the_helpers_it_calls_at_its_first_call() -> None:
    k = kernel(_add_two)
    assert k(40) == 42
    assert type(globals()["_plus_one"]).__module__.startswith("numba")  # the helper, made a Numba function first


def test_commands_that_run_no_kernel_do_not_load_numba() -> None:
    """lma serve's supervisor (cli, preflight), lma export and the schema: Numba and LLVM cost a process about 50 MB
    of anonymous memory, 100 MB of library pages and half a second, paid only where a kernel runs."""
    code = (
        "import sys, models.main, server.cli, server.registry, server.featurize, export.contract, models.data.reader;"
        " print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"


def test_a_kernel_is_cached_on_disk_where_it_can_be() -> None:
    k = kernel(_add_one)
    assert k(41) == 42
    assert isinstance(k.dispatcher._cache, numba.core.caching.FunctionCache)  # type: ignore[attr-defined]


def test_a_kernel_compiles_in_the_process_where_no_cache_location_is_writable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only image without NUMBA_CACHE_DIR: Numba finds no locator and refuses caching at decoration."""
    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator available"):  # what numba itself does
        numba.njit(cache=True)(_add_one)
    with caplog.at_level(logging.INFO, "lma.jit"):
        k = kernel(_add_one)
        assert k(41) == 42  # compiled, and its cache refused, here
    assert isinstance(k.dispatcher._cache, numba.core.caching.NullCache)  # type: ignore[attr-defined]
    assert "_add_one: compiled in this process, not cached (cannot cache function" in caplog.text


def test_packed_keys_are_the_schema_keys_through_the_compiled_lookup() -> None:
    schema = criteo_schema()
    cache = PackedKeys(schema, slot_bits=2)  # 4 slots a field: values evict each other
    values = [f"{i:08x}".encode() for i in range(20)] + [b"", b"a", b"1005"]
    packed = np.array([int.from_bytes(v.ljust(8, b"\0"), "little") for v in values], np.uint64)
    grid = np.stack([packed, packed[::-1]], axis=1)  # (n, 2): two fields
    full = np.zeros((len(values), schema.num_fields), np.uint64)
    full[:, :2] = grid
    for _ in range(2):  # cold, then with what the first pass stored
        keys = cache.rows(full)
        assert keys[:, 0].tolist() == [schema.key(0, v.decode()) for v in values]
        assert keys[:, 1].tolist() == [schema.key(1, v.decode()) for v in values[::-1]]
        assert cache.field(5, packed).tolist() == [schema.key(5, v.decode()) for v in values]
        out = np.zeros((len(values), 3), np.int64)
        cache.field(7, packed, out[:, 1])  # into a strided column
        assert out[:, 1].tolist() == [schema.key(7, v.decode()) for v in values]
        assert not out[:, [0, 2]].any()


def test_four_hot_values_of_one_bucket_all_stay_cached() -> None:
    """With one slot per hash two values evicted each other at every turn, with pairs three did; a bucket of four
    keeps four, and a fifth new value evicts the oldest of them."""
    schema = FeatureSchema(("I1",), ("C1",))
    cache = PackedKeys(schema, slot_bits=4)
    multiplier = int(_MULTIPLIER)
    # five values whose 4-bit hash lies in 4..7: one bucket, slots 4 to 7
    same = [v for v in range(1, 4000) if ((v * multiplier) % 2**64) >> 62 == 1][:5]
    rows = [np.array([[v]], np.uint64) for v in same]
    stored: list[list[int]] = []
    store = cache._store

    def recording(*args: Any) -> None:
        stored.append(args[2].tolist())
        store(*args)

    cache._store = recording  # type: ignore[method-assign]
    for _ in range(3):
        for row in rows[:4]:
            assert cache.rows(row)[0, 0] == schema.key(0, _texts(row[0])[0])
    assert stored == [[v] for v in same[:4]]  # each missed once, then all four hit
    cache.rows(rows[4])  # the first, the oldest of the four, leaves
    for row in (rows[3], rows[2], rows[1], rows[0]):
        assert cache.rows(row)[0, 0] == schema.key(0, _texts(row[0])[0])
    assert stored == [[v] for v in same] + [[same[0]]]


def test_eight_ff_bytes_are_a_value_like_any_other() -> None:
    """0xFF x 8 packs as the empty-slot value; empty slots hold key -1, which no key is, so it misses once."""
    schema = FeatureSchema((), ("a",))
    cache = PackedKeys(schema, slot_bits=4)
    value = np.array([2**64 - 1], np.uint64)
    for _ in range(2):
        assert cache.field(0, value).tolist() == [schema.key(0, b"\xff" * 8)]
        assert cache.rows(value.reshape(1, 1)).tolist() == [[schema.key(0, b"\xff" * 8)]]


def test_each_pair_of_slots_lies_in_one_cache_line() -> None:
    for bits in (2, 4, 15):
        assert PackedKeys(criteo_schema(), slot_bits=bits)._table.ctypes.data % 64 == 0
