"""Offline minhash signatures: golden values, a set-based reference, priority, and the statistical test
of DESIGN section 4 item 4 (block collisions follow (J + (1 - J) / 2**b)**K + 1/num_starts)."""

import numpy as np
import pytest
import torch

from models import inthash
from models.embeddings import EmbeddingConfig, SharedMemoryEmbedding, SharedMemoryLayout
from models.hashtable import build_table
from models.signatures import compute_signatures, minhash_params, pack, unpack

# Six rows of three fields (keys are field-specific, as the schema makes them).
SAMPLE = np.array(
    [
        [10, 20, 30],
        [10, 21, 30],
        [11, 20, 31],
        [10, 20, 32],
        [12, 22, 30],
        [10, 21, 31],
    ],
    dtype=np.int64,
)
PRIORITY = [10, 20, 30, 21, 31, 11, 12, 22, 32]  # by count (4, 3, 3, 2, 2, 1, 1, 1, 1), ties by key
GOLDEN = {
    "rows": [
        [212, 97, 131, 85],
        [212, 97, 131, 85],
        [225, 64, 131, 209],
        [238, 64, 40, 93],
        [238, 80, 40, 217],
        [198, 80, 94, 217],
        [225, 113, 58, 209],
        [225, 113, 58, 209],
        [212, 97, 76, 85],
    ],
    "context": [
        [80, 136, 63, 143],
        [80, 228, 63, 52],
        [205, 136, 244, 143],
        [47, 44, 81, 184],
        [47, 228, 6, 143],
        [178, 44, 81, 143],
        [205, 152, 244, 101],
        [53, 244, 99, 176],
        [47, 211, 24, 143],
    ],
}


def tiny_config(semantic: str = "rows", **overrides: object) -> EmbeddingConfig:
    args: dict[str, object] = {
        "kind": "lma", "embedding_dim": 4, "num_hashes": 4, "bits": 8, "per_block": 4, "seed": 1, "semantic": semantic,
    }  # fmt: skip
    return EmbeddingConfig(**(args | overrides))  # type: ignore[arg-type]


def signature_of(sample: np.ndarray, cfg: EmbeddingConfig) -> dict[int, int]:
    """Packed signature of every token of the sample."""
    sigs = compute_signatures(sample, cfg, capacity=sample.size)
    return dict(zip(sigs.keys.tolist(), sigs.signatures.tolist(), strict=True))


def reference_signatures(sample: np.ndarray, cfg: EmbeddingConfig) -> dict[int, list[int]]:
    """Minhash signatures from explicit Python sets: min over the set of h_j(element), low ``bits`` bits."""
    sets: dict[int, set[int]] = {}
    for r, row in enumerate(sample.tolist()):
        for f, token in enumerate(row):
            if cfg.semantic == "rows":
                sets.setdefault(token, set()).add(r)
            else:
                sets.setdefault(token, set()).update(t for g, t in enumerate(row) if g != f)
    out = {}
    for token, elements in sets.items():
        values = []
        for a, b, c in minhash_params(cfg).tolist():
            # A row index r is hashed as a key with zero high half: (b * r + c) % P.
            hashed = [((a * (e >> 31)) % inthash.PRIME + b * (e & (2**31 - 1)) + c) % inthash.PRIME for e in elements]
            values.append(min(hashed) % 2**cfg.bits)
        out[token] = values
    return out


class TestGolden:
    @pytest.mark.parametrize("semantic", ["rows", "context"])
    def test_tiny_sample(self, semantic: str) -> None:
        cfg = tiny_config(semantic)
        sigs = compute_signatures(SAMPLE, cfg, capacity=100)
        assert sigs.keys.tolist() == PRIORITY
        assert sigs.counts.tolist() == [4, 3, 3, 2, 2, 1, 1, 1, 1]
        assert unpack(sigs.signatures, 8, 4).tolist() == GOLDEN[semantic]
        assert sigs.signatures.tolist() == pack(np.array(GOLDEN[semantic]), 8).tolist()
        report = {k: v for k, v in sigs.report.items() if k != "seconds"}
        assert report == {
            "sample_rows": 6,
            "sample_tokens": 9,
            "eligible_tokens": 9,
            "signed_tokens": 9,
            "capacity": 100,
            "occurrence_coverage": 1.0,
        }

    def test_minhash_params_depend_on_the_seed_only(self) -> None:
        assert minhash_params(tiny_config()).tolist() == [
            [1024353533, 226753549, 1475838380],
            [1753727471, 870573328, 1738767407],
            [1900820368, 1880014573, 220112515],
            [340080912, 1876207739, 1235340513],
        ]
        assert np.array_equal(minhash_params(tiny_config()), minhash_params(tiny_config("context", bits=12)))
        assert not np.array_equal(minhash_params(tiny_config()), minhash_params(tiny_config(seed=2)))


class TestSemantics:
    @pytest.mark.parametrize("semantic", ["rows", "context"])
    def test_matches_set_reference(self, semantic: str) -> None:
        rng = np.random.default_rng(0)
        sample = rng.integers(0, 12, size=(300, 4)) + 100 * np.arange(4) + rng.integers(0, 2, size=(1, 4)) * 2**40
        sample[::7, 2] = 2**62 - 1  # a high key: both halves of the context hash in play
        cfg = tiny_config(semantic, num_hashes=6, bits=10, seed=7)
        sigs = compute_signatures(sample, cfg, capacity=10_000)
        reference = reference_signatures(sample, cfg)
        assert sorted(sigs.keys.tolist()) == sorted(reference)
        got = unpack(sigs.signatures, 10, 6).tolist()
        assert {k: v for k, v in zip(sigs.keys.tolist(), got, strict=True)} == reference

    def test_identical_row_sets_identical_signatures(self) -> None:
        by_key = signature_of(SAMPLE, tiny_config())
        assert by_key[12] == by_key[22]  # both only in row 4
        assert by_key[12] != by_key[32]  # row 4 vs row 3

    def test_context_makes_same_field_tokens_comparable(self) -> None:
        sample = np.array([[1, 5, 7], [2, 5, 7], [3, 6, 8]])
        context = signature_of(sample, tiny_config("context"))
        assert context[1] == context[2]  # same context {5, 7}, never the same row
        assert context[1] != context[3]
        rows = signature_of(sample, tiny_config())
        assert rows[1] != rows[2]


class TestPriority:
    def test_min_count_and_capacity(self) -> None:
        sigs = compute_signatures(SAMPLE, tiny_config(min_count=2), capacity=3)
        assert sigs.keys.tolist() == [10, 20, 30]  # most frequent first, ties by key
        assert sigs.counts.tolist() == [4, 3, 3]
        assert (
            sigs.signatures.tolist() == pack(np.array(GOLDEN["rows"][:3]), 8).tolist()
        )  # same values as without the limits
        assert sigs.report["eligible_tokens"] == 5
        assert sigs.report["signed_tokens"] == 3
        assert sigs.report["occurrence_coverage"] == 10 / 18

    def test_min_count_alone(self) -> None:
        sigs = compute_signatures(SAMPLE, tiny_config(min_count=3), capacity=100)
        assert sigs.keys.tolist() == [10, 20, 30]

    def test_zero_capacity(self) -> None:
        sigs = compute_signatures(SAMPLE, tiny_config(), capacity=0)
        assert sigs.keys.size == sigs.signatures.size == sigs.counts.size == 0
        assert sigs.signatures.dtype == np.int64
        assert sigs.report["occurrence_coverage"] == 0.0

    def test_bad_input(self) -> None:
        with pytest.raises(ValueError, match=r"sample_keys must be \(rows, fields\), got shape \(6,\)"):
            compute_signatures(SAMPLE[:, 0], tiny_config(), capacity=10)
        with pytest.raises(ValueError, match="'context' needs at least two categorical fields"):
            compute_signatures(SAMPLE[:, :1], tiny_config("context"), capacity=10)


class TestPacking:
    @pytest.mark.parametrize(("bits", "count"), [(4, 15), (16, 3), (1, 62), (30, 2), (8, 4)])
    def test_pack_unpack_inverse(self, bits: int, count: int) -> None:
        values = np.random.default_rng(bits).integers(0, 2**bits, size=(200, count), dtype=np.int64)
        packed = pack(values, bits)
        assert packed.dtype == np.int64
        assert packed.min() >= 0
        assert packed.max() < 2 ** (bits * count)
        np.testing.assert_array_equal(unpack(packed, bits, count), values)

    def test_layout_of_the_bits(self) -> None:
        assert pack(np.array([[1, 2, 3]]), 4).tolist() == [1 + 2 * 16 + 3 * 256]
        assert pack(np.array([GOLDEN["rows"][0]]), 8).tolist() == [1434673620]  # 85 << 24 | 131 << 16 | 97 << 8 | 212
        assert pack(np.array([[15] * 15]), 4).tolist() == [2**60 - 1]
        assert unpack(np.array([0x321]), 4, 3).tolist() == [[1, 2, 3]]


def jaccard_sample(
    rng: np.random.Generator, jaccards: list[float], pairs_per_j: int, union: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row sample (R, 2) in which pair p's tokens a_p (field 0) and b_p (field 1) have row sets of
    Jaccard exactly J_p: each pair owns ``union`` random rows, both tokens occur in J * union of them
    and the rest is split between the two. Cells a pair leaves empty hold a padding token per field.

    Returns: sample, a_keys, b_keys, J of every pair.
    """
    js = np.repeat(np.array(jaccards), pairs_per_j)
    num_pairs = js.size
    rows = rng.permutation(num_pairs * union).reshape(num_pairs, union)  # (P, U) disjoint row sets
    a_keys = 2 + 2 * np.arange(num_pairs, dtype=np.int64)
    b_keys = a_keys + 1
    both = np.rint(js * union).astype(np.int64)[:, None]  # (P, 1)
    a_end = both + (union - both) // 2
    position = np.arange(union)[None, :]  # (1, U)
    in_a = position < a_end  # (P, U): rows [0, a_end) of the pair
    in_b = (position < both) | (position >= a_end)  # shared rows and the rest
    sample = np.stack([np.zeros(num_pairs * union, np.int64), np.ones(num_pairs * union, np.int64)], axis=1)
    sample[rows[in_a], 0] = np.broadcast_to(a_keys[:, None], in_a.shape)[in_a]
    sample[rows[in_b], 1] = np.broadcast_to(b_keys[:, None], in_b.shape)[in_b]
    return sample, a_keys, b_keys, js


@pytest.mark.parametrize(("num_hashes", "bits", "per_block"), [(15, 4, 8), (3, 16, 2)])
def test_block_collisions_follow_jaccard(num_hashes: int, bits: int, per_block: int) -> None:
    """P(two tokens' block starts are equal) = q + (1 - q) / num_starts, q = (J + (1 - J) / 2**b)**K."""
    jaccards = [0.0, 0.2, 0.5, 0.8, 1.0]
    pairs_per_j = 2000
    rng = np.random.default_rng(2021)
    sample, a_keys, b_keys, js = jaccard_sample(rng, jaccards, pairs_per_j, union=60)
    cfg = EmbeddingConfig(
        kind="lma", embedding_dim=8, block_size=1, num_hashes=num_hashes, bits=bits, per_block=per_block, seed=11
    )
    sigs = compute_signatures(sample, cfg, capacity=sample.size)
    assert sigs.keys.size == 2 * js.size + 2  # every token signed (the two paddings too)
    buckets = 1 << int(np.ceil(np.log2(sigs.keys.size / (cfg.slots * 0.9))))
    tk, tv, params, report = build_table(sigs.keys, sigs.signatures, buckets, cfg.slots, seed=cfg.seed)
    assert report["dropped"] == 0
    emb = SharedMemoryEmbedding(cfg, 2, SharedMemoryLayout(memory_size=512 * cfg.block_size, table_buckets=buckets))
    num_starts = emb.num_starts  # 512 rows of Z floats
    emb.signatures.load(tk, tv, params)

    starts, stored = emb.block_starts(torch.from_numpy(np.stack([a_keys, b_keys], axis=1)))  # (P, 2, T=8)
    assert stored.all()
    equal = (starts[:, 0] == starts[:, 1]).double().mean(1).numpy()  # (P,) share of equal blocks per pair
    for j in jaccards:
        q = (j + (1 - j) / 2**bits) ** per_block
        p = q + (1 - q) / num_starts
        # Blocks of one pair share packed values, so count pairs, not blocks: the mean of P per-pair
        # shares in [0, 1] has variance at most p (1 - p) / P.
        sigma = np.sqrt(p * (1 - p) / pairs_per_j)
        observed = equal[js == j].mean()
        assert abs(observed - p) <= 4 * sigma + 1e-12, f"J={j}: observed {observed:.5f}, expected {p:.5f}"
