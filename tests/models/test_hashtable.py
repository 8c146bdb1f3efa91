"""The static cuckoo table: exact lookups (no miss, no false hit), priority order, sizes, bad input."""

import numpy as np
import pytest
import torch

from models.hashtable import (
    EMPTY,
    StaticHashTable,
    bucket_hashes,
    buckets_for_bytes,
    build_table,
    table_bytes,
)

NUM_BUCKETS = 1 << 15
SLOTS = 4
MISSING = -7


def distinct_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random 62-bit keys in random order."""
    keys = np.unique(rng.integers(0, 2**62, size=n + n // 10 + 16, dtype=np.int64))
    return rng.permutation(keys)[:n]


def lookup(table: torch.nn.Module, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, found = table(torch.from_numpy(keys), torch.tensor(MISSING))
    return values.numpy(), found.numpy()


@pytest.fixture(scope="module")
def full_table() -> tuple[StaticHashTable, np.ndarray, np.ndarray, dict]:
    """A table at load 0.9 (117,964 keys in 131,072 slots), values full 62-bit width."""
    rng = np.random.default_rng(0)
    n = int(0.9 * NUM_BUCKETS * SLOTS)
    keys = distinct_keys(rng, n)
    values = rng.integers(0, 2**62, size=n, dtype=np.int64)
    tk, tv, params, report = build_table(keys, values, NUM_BUCKETS, SLOTS, seed=1, max_load=0.9)
    table = StaticHashTable(NUM_BUCKETS, SLOTS)
    table.load(tk, tv, params)
    return table, keys, values, report


class TestExactness:
    def test_build_report(self, full_table) -> None:
        _, keys, _, report = full_table
        assert report == {"inserted": keys.size, "dropped": 0, "load": keys.size / (NUM_BUCKETS * SLOTS)}

    def test_every_stored_key_found_with_its_value(self, full_table) -> None:
        table, keys, values, _ = full_table
        got, found = lookup(table, keys)
        assert found.all()
        np.testing.assert_array_equal(got, values)

    def test_keys_whose_two_buckets_coincide(self, full_table) -> None:
        # A key whose two candidate buckets are the same must still read its value once.
        table, keys, values, _ = full_table
        b1, b2 = bucket_hashes(keys, table.params, table.bucket_mask)
        same = np.flatnonzero(b1 == b2)
        assert same.size > 0  # ~keys / buckets of them: 3 or so
        got, found = lookup(table, keys[same])
        assert found.all()
        np.testing.assert_array_equal(got, values[same])

    def test_scripted_lookup_matches(self, full_table) -> None:
        table, keys, values, _ = full_table
        scripted = torch.jit.script(table)
        got, found = lookup(scripted, keys)
        assert found.all()
        np.testing.assert_array_equal(got, values)

    def test_million_absent_keys_never_found(self, full_table) -> None:
        table, keys, _, _ = full_table
        rng = np.random.default_rng(2)
        absent = rng.integers(0, 2**62, size=1_000_000, dtype=np.int64)
        absent = absent[~np.isin(absent, keys)]
        assert absent.size > 999_990
        for batch in np.array_split(absent, 4):
            got, found = lookup(table, batch)
            assert not found.any()
            assert (got == MISSING).all()

    def test_any_shape_and_broadcast_default(self, full_table) -> None:
        table, keys, values, _ = full_table
        q = np.array([[keys[0], 5], [7, keys[1]]], dtype=np.int64)  # (2, 2)
        default = torch.tensor([-1, -2])  # per column, broadcast over rows
        got, found = table(torch.from_numpy(q), default)
        assert got.tolist() == [[values[0], -2], [-1, values[1]]]
        assert found.tolist() == [[True, False], [False, True]]


class TestBuild:
    def test_tiny_table_exact_contents(self) -> None:
        tk, tv, params, report = build_table(np.array([5, 9]), np.array([50, 90]), 4, 2, seed=0)
        assert tk.shape == tv.shape == (4, 2)
        assert params.shape == (2, 3)
        assert sorted(tk[tk != EMPTY].tolist()) == [5, 9]
        assert dict(zip(tk[tk != EMPTY].tolist(), tv[tk != EMPTY].tolist(), strict=True)) == {5: 50, 9: 90}
        assert report == {"inserted": 2, "dropped": 0, "load": 0.25}
        table = StaticHashTable(4, 2)
        table.load(tk, tv, params)
        got, found = table(torch.tensor([[5, 7, 9]]), torch.tensor(-1))
        assert got.tolist() == [[50, -1, 90]]
        assert found.tolist() == [[True, False, True]]

    def test_priority_order_kept_over_capacity(self) -> None:
        rng = np.random.default_rng(3)
        keys = distinct_keys(rng, 1000)
        values = np.arange(1000, dtype=np.int64)
        tk, tv, params, report = build_table(keys, values, 256, 4, seed=4, max_load=0.9)
        limit = int(0.9 * 256 * 4)  # 921
        assert report == {"inserted": limit, "dropped": 1000 - limit, "load": limit / 1024}
        table = StaticHashTable(256, 4)
        table.load(tk, tv, params)
        got, found = lookup(table, keys)
        assert found[:limit].all()  # the first (most important) keys are kept
        assert not found[limit:].any()  # the rest are dropped, never answered wrongly
        np.testing.assert_array_equal(got[:limit], values[:limit])

    def test_deterministic(self) -> None:
        keys = distinct_keys(np.random.default_rng(5), 500)
        a = build_table(keys, keys // 3, 128, 4, seed=9)
        b = build_table(keys, keys // 3, 128, 4, seed=9)
        for x, y in zip(a[:3], b[:3], strict=True):
            np.testing.assert_array_equal(x, y)

    def test_empty_table_returns_default(self) -> None:
        tk, tv, params, report = build_table(np.array([3, 4]), np.array([1, 2]), 0, 4, seed=0)
        assert tk.shape == tv.shape == (0, 4)
        assert report == {"inserted": 0, "dropped": 2, "load": 0.0}
        table = StaticHashTable(0, 4)
        table.load(tk, tv, params)
        assert table.memory_bytes == 0
        for module in (table, torch.jit.script(table)):
            got, found = module(torch.tensor([[3, 4], [5, 6]]), torch.tensor([10, 11]))
            assert got.tolist() == [[10, 11], [10, 11]]
            assert found.tolist() == [[False, False], [False, False]]

    def test_no_keys(self) -> None:
        tk, _, _, report = build_table(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 8, 2, seed=0)
        assert (tk == EMPTY).all()
        assert report == {"inserted": 0, "dropped": 0, "load": 0.0}


class TestBadInput:
    @pytest.mark.parametrize(
        ("keys", "values", "num_buckets", "message"),
        [
            ([1, 2, 1], [0, 0, 0], 4, "unique"),
            ([1, -2], [0, 0], 4, "non-negative"),
            ([1, 2], [0, 0], 6, "power of two, got 6"),
            ([1, 2], [0, 0], -4, "power of two, got -4"),
            ([1, 2], [0], 4, r"one length, got \(2,\) and \(1,\)"),
        ],
    )
    def test_build_table(self, keys: list[int], values: list[int], num_buckets: int, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            build_table(np.array(keys), np.array(values), num_buckets, 4, seed=0)

    @pytest.mark.parametrize(
        ("num_buckets", "slots", "message"),
        [(3, 4, "power of two, got 3"), (-2, 4, "power of two, got -2"), (4, 0, "slots must be >= 1, got 0")],
    )
    def test_module(self, num_buckets: int, slots: int, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            StaticHashTable(num_buckets, slots)

    def test_load_wrong_shape(self) -> None:
        tk, tv, params, _ = build_table(np.array([1]), np.array([2]), 8, 4, seed=0)
        with pytest.raises(ValueError, match=r"table shape \(8, 4\) != \(4, 4\)"):
            StaticHashTable(4, 4).load(tk, tv, params)


class TestSizes:
    def test_table_bytes(self) -> None:
        assert table_bytes(0, 4) == 0
        assert table_bytes(8, 4) == 8 * 4 * 16 + 48  # keys + values of every slot, six int64 seeds
        assert StaticHashTable(8, 4).memory_bytes == 560

    @pytest.mark.parametrize(
        ("budget", "slots", "buckets"),
        [(0, 4, 0), (63, 4, 0), (64 + 48, 4, 1), (1000, 4, 8), (10**6, 4, 8192), (64 * 2**19 + 48, 4, 2**19)],
    )
    def test_buckets_for_bytes(self, budget: int, slots: int, buckets: int) -> None:
        assert buckets_for_bytes(budget, slots) == buckets

    def test_buckets_for_bytes_fits_the_budget(self) -> None:
        # The table it sizes, seeds included, never exceeds the byte budget (and doubling would).
        for budget in [*range(0, 5000, 7), 2**20, 2**20 + 47, 2**20 + 48, 33_762_577]:
            buckets = buckets_for_bytes(budget, 4)
            assert table_bytes(buckets, 4) <= budget, budget
            assert table_bytes(max(2 * buckets, 1), 4) > budget, budget
