"""The static cuckoo table: exact lookups (no miss, no false hit), priority order, sizes, bad input."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import inthash
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
    """(values, found) of 1-D keys, looked up as one (1, N) batch (the table takes (B, F) keys)."""
    values, found = table(torch.from_numpy(keys).reshape(1, -1), torch.tensor(MISSING))
    return values.numpy()[0], found.numpy()[0]


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

    def test_empty_slot_key_is_never_found(self, full_table) -> None:
        # Empty slots hold key -1 and value -1: a -1 query (never a real key) matches them and still misses.
        table, _, _, _ = full_table
        assert (table.table_values[table.table_keys == EMPTY] == EMPTY).all()
        got, found = lookup(table, np.full(8, EMPTY, dtype=np.int64))
        assert not found.any()
        assert (got == MISSING).all()

    def test_any_shape_and_broadcast_default(self, full_table) -> None:
        table, keys, values, _ = full_table
        q = np.array([[keys[0], 5], [7, keys[1]]], dtype=np.int64)  # (2, 2)
        default = torch.tensor([-1, -2])  # per column, broadcast over rows
        got, found = table(torch.from_numpy(q), default)
        assert got.tolist() == [[values[0], -2], [-1, values[1]]]
        assert found.tolist() == [[True, False], [False, True]]


class TestLayoutAndExtraHashes:
    def test_keys_and_values_of_a_bucket_share_one_row(self) -> None:
        tk, tv, params, _ = build_table(np.array([5, 9, 12]), np.array([50, 90, 120]), 4, 2, seed=0)
        table = StaticHashTable(4, 2)
        table.load(tk, tv, params)
        assert table.rows.shape == (4, 4)  # (buckets, 2 * slots): 2 keys then their 2 values
        np.testing.assert_array_equal(table.rows.numpy(), np.concatenate([tk, np.where(tk == EMPTY, -1, tv)], 1))
        np.testing.assert_array_equal(table.table_keys.numpy(), tk)
        assert table.rows.numel() * 8 + 48 == table.memory_bytes  # the accounting: keys, values, six seeds

    def test_extra_hashes_come_with_the_lookup(self, tmp_path: Path) -> None:
        """lookup() returns E more hashes of every key, identical in NumPy, eager, TorchScript and ONNX Runtime,
        computed in the same pass as the buckets."""
        rng = np.random.default_rng(8)
        keys = distinct_keys(rng, 40)
        tk, tv, params, _ = build_table(keys[:20], keys[:20] % 1000, 8, 4, seed=3)
        extra = inthash.draw_params(rng, 3)
        table = StaticHashTable(8, 4, extra_params=extra)
        table.load(tk, tv, params)
        q = np.concatenate([keys, [0, 2**62 - 1]]).reshape(6, 7)
        want_extra = np.stack([inthash.hash_key(q, *(int(x) for x in p)) for p in extra])  # (3, 6, 7)
        want_value = np.where(np.isin(q, keys[:20]), q % 1000, -1)

        class Lookup(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.table = table

            def forward(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                value, found, extras = self.table.lookup(k)
                return value, found, torch.cat(extras)

        module = Lookup().eval()
        path = tmp_path / "lookup.onnx"
        torch.onnx.export(
            module, (torch.from_numpy(q[:2]),), str(path), input_names=["keys"], dynamic_axes={"keys": {0: "b"}},
            opset_version=18, dynamo=False,
        )  # fmt: skip
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = {
            "eager": [t.numpy() for t in module(torch.from_numpy(q))],
            "torchscript": [t.numpy() for t in torch.jit.script(module)(torch.from_numpy(q))],
            "onnx": session.run(None, {"keys": q}),
        }
        for runtime, (value, found, got_extra) in outputs.items():
            np.testing.assert_array_equal(value, want_value, err_msg=runtime)
            np.testing.assert_array_equal(found, want_value >= 0, err_msg=runtime)
            np.testing.assert_array_equal(got_extra, want_extra, err_msg=runtime)

    def test_empty_table_still_computes_extra_hashes(self) -> None:
        extra = np.array([[3, 5, 7]], dtype=np.int64)
        table = StaticHashTable(0, 4, extra_params=extra)
        value, found, got = table.lookup(torch.tensor([[2**31 + 2]]))
        assert value.tolist() == [[-1]] and found.tolist() == [[False]]
        assert [t.tolist() for t in got] == [[[[3 * 1 + 5 * 2 + 7]]]]  # one (1, B, F) tensor per extra hash

    def test_state_dict_round_trip_and_legacy_layout(self) -> None:
        keys = distinct_keys(np.random.default_rng(6), 30)
        tk, tv, params, _ = build_table(keys, keys % 77, 16, 4, seed=2)
        table = StaticHashTable(16, 4, extra_params=np.array([[1, 2, 3]]))
        table.load(tk, tv, params)
        fresh = StaticHashTable(16, 4, extra_params=np.array([[1, 2, 3]]))
        fresh.load_state_dict(table.state_dict(), strict=True)
        assert sorted(table.state_dict()) == ["extra_hash_params", "hash_params", "rows"]
        assert fresh.params == table.params
        q = torch.from_numpy(keys).reshape(3, 10)
        (v1, f1, e1), (v2, f2, e2) = fresh.lookup(q), table.lookup(q)
        assert torch.equal(v1, v2) and torch.equal(f1, f2) and torch.equal(e1[0], e2[0])
        # Run folders written before keys and values shared a row hold table_keys / table_values (and, for
        # the full kind, no extra hashes): they load into the same table.
        legacy = {"table_keys": torch.from_numpy(tk), "table_values": torch.from_numpy(tv),
                  "hash_params": torch.from_numpy(params)}  # fmt: skip
        old = StaticHashTable(16, 4)
        old.load_state_dict(legacy, strict=True)
        got, found = lookup(old, keys)
        assert found.all()
        np.testing.assert_array_equal(got, keys % 77)


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

    def test_negative_stored_values_refused(self) -> None:
        tk, tv, params, _ = build_table(np.array([1, 2]), np.array([2, -3]), 4, 4, seed=0)
        with pytest.raises(ValueError, match="stored values must be non-negative"):
            StaticHashTable(4, 4).load(tk, tv, params)

    def test_bad_extra_hashes(self) -> None:
        with pytest.raises(ValueError, match=r"extra_params must be \(E, 3\) hash parameters, got shape \(2, 2\)"):
            StaticHashTable(4, 4, extra_params=np.zeros((2, 2)))


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
