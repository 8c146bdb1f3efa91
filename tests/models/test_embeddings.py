"""Embeddings: config checks, layout arithmetic, shapes, gradients, hash == LMA without signatures,
determinism, TorchScript and state-dict round trips. Tiny configs, exact values."""

import numpy as np
import pytest
import torch

from models import inthash
from models.embeddings import (
    BLOCK_HASH_BUFFERS,
    EmbeddingConfig,
    FullEmbedding,
    SharedMemoryEmbedding,
    SharedMemoryLayout,
    seed_bytes,
)
from models.hashtable import build_table

F = 3  # fields
FULL_BYTES = 1000 * 4 * 4  # 1000 tokens x D=4 x 4 bytes


def tiny_config(kind: str = "lma", **overrides: object) -> EmbeddingConfig:
    args: dict[str, object] = {"kind": kind, "embedding_dim": 4, "block_size": 2, "compression": 4.0, "seed": 3}
    return EmbeddingConfig(**(args | overrides))  # type: ignore[arg-type]


def random_keys(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**62, size=shape, dtype=np.int64)


def lma_with_table(stored_keys: np.ndarray, cfg: EmbeddingConfig | None = None) -> SharedMemoryEmbedding:
    """A tiny LMA embedding whose signature table holds ``stored_keys`` with random full-width signatures."""
    cfg = cfg or tiny_config()
    layout = SharedMemoryLayout.plan(cfg, FULL_BYTES)
    emb = SharedMemoryEmbedding(cfg, F, layout)
    signatures = np.random.default_rng(11).integers(0, 2**60, size=stored_keys.size, dtype=np.int64)
    tk, tv, params, report = build_table(stored_keys, signatures, layout.table_buckets, cfg.slots, seed=cfg.seed)
    assert report["dropped"] == 0
    emb.signatures.load(tk, tv, params)
    return emb


def block_rows_of(emb: SharedMemoryEmbedding, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The embedding's block rows of signatures given by their halves (N,) -> (N, T), in NumPy."""
    buffers = [getattr(emb, n).numpy() for n in BLOCK_HASH_BUFFERS]
    rows = inthash.block_rows(np.asarray(hi)[None], np.asarray(lo)[None], *(b[:, 0] for b in buffers), emb.num_starts)
    return rows.T  # (T, N) -> (N, T)


class TestConfig:
    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"kind": "dense"}, "kind must be one of .* got 'dense'"),
            ({"embedding_dim": 0}, "embedding_dim must be >= 1, got 0"),
            ({"compression": 0.5}, "compression must be >= 1, got 0.5"),
            ({"block_size": 3}, "block_size must divide embedding_dim 4, got 3"),
            ({"bits": 31}, r"bits must be in \[1, 30\], got 31"),
            ({"bits": 0}, r"bits must be in \[1, 30\], got 0"),
            ({"num_hashes": 16}, r"num_hashes \* bits must be <= 62 .* got 16\*4"),
            ({"per_block": 16}, r"per_block must be in \[1, num_hashes=15\], got 16"),
            ({"per_block": 7}, r"per_block \* bits must be >= 32.* got 7\*4"),
            ({"signature_share": 1.0}, r"signature_share must be in \[0, 1\), got 1.0"),
            ({"semantic": "words"}, "semantic must be one of .* got 'words'"),
            ({"max_load": 0.0}, r"max_load must be in \(0, 1\], got 0.0"),
            ({"min_count": 0}, "min_count must be >= 1, got 0"),
            ({"sample_rows": 0}, "sample_rows must be >= 1, got 0"),
            ({"slots": 0}, "slots must be >= 1, got 0"),
        ],
    )
    def test_errors_name_the_value(self, overrides: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            tiny_config(**overrides)

    def test_location_scheme_recorded_and_checked(self) -> None:
        cfg = tiny_config()
        assert cfg.location_scheme == inthash.LOCATION_SCHEME == "lma-locations-v2"
        assert cfg.to_dict()["location_scheme"] == "lma-locations-v2"
        # A config written before schemes were recorded is of the legacy scheme: refused for hash and lma,
        # naming both schemes (its shared memory was trained for other rows), fine for full (no locations).
        legacy = {k: v for k, v in cfg.to_dict().items() if k != "location_scheme"}
        for kind in ("lma", "hash"):
            with pytest.raises(ValueError, match=r"location_scheme 'lma-locations-v1' is not supported: this build .*"
                               r"'lma-locations-v2'.* retrain"):  # fmt: skip
                EmbeddingConfig.from_dict({**legacy, "kind": kind})
        assert EmbeddingConfig.from_dict({**legacy, "kind": "full"}).kind == "full"
        with pytest.raises(ValueError, match="location_scheme 'lma-locations-v9' is not supported"):
            tiny_config(location_scheme="lma-locations-v9")

    def test_full_kind_allows_short_bucket_keys(self) -> None:
        assert tiny_config(kind="full", per_block=2).per_block == 2

    @pytest.mark.parametrize(("dim", "block"), [(4, 4), (12, 4), (16, 8), (6, 2), (1, 1)])
    def test_default_block_size(self, dim: int, block: int) -> None:
        cfg = EmbeddingConfig(embedding_dim=dim, block_size=0, per_block=8)
        assert cfg.block_size == block
        assert cfg.num_blocks == dim // block

    def test_dict_round_trip(self) -> None:
        cfg = tiny_config(semantic="context", min_count=2)
        assert EmbeddingConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match=r"unknown embedding config entries: \['colour'\]"):
            EmbeddingConfig.from_dict({**cfg.to_dict(), "colour": "red"})


class TestLayout:
    def test_lma_numbers(self) -> None:
        cfg = tiny_config()
        # budget 16000 / 4 = 4000 bytes; a quarter (1000) buys 8 buckets x 4 slots x 16 B + 48 B of seeds;
        # seeds of the graph: the fallback signature's two hashes (2 x 3) and, per block (T=2), the halves of
        # its value mask and its hash (2 + 3): 8 * (6 + 2 * 5) = 128 bytes. M: 828 floats = 414 rows of Z=2.
        assert seed_bytes(cfg) == 128
        layout = SharedMemoryLayout.plan(cfg, FULL_BYTES)
        assert layout == SharedMemoryLayout(memory_size=828, table_buckets=8)
        assert 828 * 4 + 560 + 128 == 4000

    def test_hash_numbers(self) -> None:
        layout = SharedMemoryLayout.plan(tiny_config("hash"), FULL_BYTES)
        assert layout == SharedMemoryLayout(memory_size=(4000 - 128) // 4, table_buckets=0)

    def test_rounding_below_one_float(self) -> None:
        layout = SharedMemoryLayout.plan(tiny_config(), FULL_BYTES + 2)  # budget 4000.5 bytes
        assert layout.memory_size == 828

    @pytest.mark.parametrize("kind", ["hash", "lma"])
    @pytest.mark.parametrize("compression", [1.0, 3.0, 16.0, 17.5])
    @pytest.mark.parametrize("full_bytes", [64_000, 160_004, 2_160_804_928])
    def test_budget_identity(self, kind: str, compression: float, full_bytes: int) -> None:
        """full / compression == shared memory + table + seeds + less than one float of rounding."""
        cfg = EmbeddingConfig(kind=kind, embedding_dim=16, compression=compression)
        layout = SharedMemoryLayout.plan(cfg, full_bytes)
        table = 0 if kind == "hash" else layout.table_buckets * cfg.slots * 16 + 48
        spent = layout.memory_size * 4 + table + seed_bytes(cfg)
        rounding = full_bytes / compression - spent
        assert 0 <= rounding < 4
        assert table <= cfg.signature_share * full_bytes / compression

    def test_too_little_memory(self) -> None:
        with pytest.raises(ValueError, match=r"compression 4.0 leaves -\d+ floats .* lower the compression"):
            SharedMemoryLayout.plan(tiny_config(), 400)

    def test_memory_beyond_hash_range(self) -> None:
        with pytest.raises(ValueError, match=r"exceeds the hash range 2\*\*31 - 1"):
            SharedMemoryLayout.plan(tiny_config("hash", compression=1.0), 2**33 + 4000)


class TestSharedMemory:
    def test_shapes_and_values_read_as_is(self) -> None:
        emb = lma_with_table(random_keys(0, (10,)))
        keys = torch.from_numpy(random_keys(1, (5, F)))
        vectors, stored = emb(keys)
        assert vectors.shape == (5, F, 4)
        assert vectors.dtype == torch.float32
        assert stored.shape == (5, F)
        starts, _ = emb.block_starts(keys)  # (5, F, 2)
        assert starts.shape == (5, F, 2)
        assert int(starts.max()) < emb.num_starts
        memory = emb.memory.detach()
        want = torch.cat(
            [memory[2 * starts[..., 0, None] + torch.arange(2)], memory[2 * starts[..., 1, None] + torch.arange(2)]], -1
        )
        assert torch.equal(vectors, want)  # no sign, no scaling

    def test_stored_flags_signatures_and_rows(self) -> None:
        stored_keys = random_keys(0, (10,))
        emb = lma_with_table(stored_keys)
        keys = np.stack([stored_keys[:3], random_keys(4, (3,))])  # (2, F): row 0 stored, row 1 not
        sig, stored, fallback = emb.signatures.lookup(torch.from_numpy(keys))
        assert stored.tolist() == [[True] * F, [False] * F]
        expected_signatures = np.random.default_rng(11).integers(0, 2**60, size=10, dtype=np.int64)
        assert sig[0].tolist() == expected_signatures[:3].tolist()
        assert sig[1].tolist() == [-1] * F
        # The others get a signature hashed from their key: two universal hashes of it are its halves.
        (hi_params, lo_params) = emb.signatures.extra_hash_params.tolist()
        assert fallback[0][0, 1].tolist() == inthash.hash_key(keys[1], *hi_params).tolist()
        assert fallback[1][0, 1].tolist() == inthash.hash_key(keys[1], *lo_params).tolist()
        starts, flags = emb.block_starts(torch.from_numpy(keys))
        assert torch.equal(flags, stored)
        assert starts[0].tolist() == block_rows_of(emb, *inthash.key_halves(expected_signatures[:3])).tolist()
        fb_hi, fb_lo = inthash.hash_key(keys[1], *hi_params), inthash.hash_key(keys[1], *lo_params)
        assert starts[1].tolist() == block_rows_of(emb, fb_hi, fb_lo).tolist()

    @pytest.mark.parametrize("kind", ["hash", "lma"])
    def test_gradients_sum_into_the_slots_read(self, kind: str) -> None:
        emb = (
            lma_with_table(random_keys(0, (10,)))
            if kind == "lma"
            else SharedMemoryEmbedding(tiny_config("hash"), F, SharedMemoryLayout.plan(tiny_config("hash"), FULL_BYTES))
        )
        keys = np.concatenate([random_keys(2, (6, F)), random_keys(2, (2, F))])  # rows repeat: shared slots
        if kind == "lma":
            keys[0] = random_keys(0, (10,))[:F]
        keys_t = torch.from_numpy(keys)
        weights = torch.from_numpy(np.random.default_rng(3).integers(-3, 4, size=(8, F, 4)).astype(np.float32))
        vectors, _ = emb(keys_t)
        (vectors * weights).sum().backward()

        starts, _ = emb.block_starts(keys_t)  # (8, F, 2)
        z = emb.block_size
        index = (starts.unsqueeze(-1) * z + torch.arange(z)).reshape(8, F, 4)  # float of M of every coordinate
        expected = np.zeros(emb.memory_size, dtype=np.float32)
        np.add.at(expected, index.numpy().ravel(), weights.numpy().ravel())
        assert emb.memory.grad is not None
        grad = emb.memory.grad.numpy()
        np.testing.assert_array_equal(grad, expected)  # small integers: exact sums
        read = np.zeros(emb.memory_size, dtype=bool)
        read[index.numpy().ravel()] = True
        assert not grad[~read].any()

    def test_hash_is_lma_with_an_empty_table(self) -> None:
        layout = SharedMemoryLayout.plan(tiny_config(), FULL_BYTES)  # sizes of the LMA: same M for both
        hashed = SharedMemoryEmbedding(tiny_config("hash"), F, SharedMemoryLayout(layout.memory_size, 0))
        lma = lma_with_table(random_keys(0, (20,)))
        assert lma.memory_size == hashed.memory_size
        keys = torch.from_numpy(random_keys(7, (16, F)))  # none of them is in the LMA table
        v_hash, s_hash = hashed(keys)
        v_lma, s_lma = lma(keys)
        assert torch.equal(v_hash, v_lma)
        assert not s_hash.any()
        assert not s_lma.any()
        assert hashed.memory_parts()["signature_table"] == 0

    def test_unseen_tokens_deterministic_across_instances(self) -> None:
        keys = torch.from_numpy(random_keys(8, (4, F)))
        a, _ = lma_with_table(random_keys(0, (10,)))(keys)
        b, _ = lma_with_table(random_keys(0, (10,)))(keys)
        assert torch.equal(a, b)
        other_seed, _ = lma_with_table(random_keys(0, (10,)), tiny_config(seed=4))(keys)
        assert not torch.equal(a, other_seed)

    def test_same_key_same_vector_in_every_field(self) -> None:
        # One shared memory: the embedding does not look at the field, only at the key (the schema
        # makes keys field-specific).
        emb = lma_with_table(random_keys(0, (10,)))
        key = int(random_keys(9, (1,))[0])
        vectors, _ = emb(torch.tensor([[key, key, key]]))
        assert torch.equal(vectors[0, 0], vectors[0, 1])
        assert torch.equal(vectors[0, 0], vectors[0, 2])

    @pytest.mark.parametrize("kind", ["hash", "lma"])
    def test_torchscript_matches_eager(self, kind: str) -> None:
        stored = random_keys(0, (10,))
        if kind == "lma":
            emb = lma_with_table(stored)
        else:
            emb = SharedMemoryEmbedding(tiny_config(kind), F, SharedMemoryLayout.plan(tiny_config(kind), FULL_BYTES))
        keys = torch.from_numpy(np.concatenate([stored[:F][None], random_keys(5, (7, F))]))
        scripted = torch.jit.script(emb)
        for a, b in zip(emb(keys), scripted(keys), strict=True):
            assert torch.equal(a, b)

    def test_state_dict_round_trip(self) -> None:
        stored = random_keys(0, (10,))
        trained = lma_with_table(stored)
        with torch.no_grad():
            trained.memory.mul_(-2.0).add_(0.125)  # as if trained
        keys = torch.from_numpy(np.concatenate([stored[:F][None], random_keys(5, (3, F))]))
        fresh = SharedMemoryEmbedding(trained.config, F, SharedMemoryLayout.plan(trained.config, FULL_BYTES))
        assert not torch.equal(fresh(keys)[0], trained(keys)[0])
        fresh.load_state_dict(trained.state_dict(), strict=True)
        assert fresh.signatures.params == trained.signatures.params  # hash constants synced from the buffer
        for a, b in zip(fresh(keys), trained(keys), strict=True):
            assert torch.equal(a, b)

    def test_memory_parts(self) -> None:
        assert lma_with_table(random_keys(0, (10,))).memory_parts() == {
            "shared_memory": 828 * 4,
            "signature_table": 8 * 4 * 16 + 48,
            "seeds": 128,
        }

    def test_wrong_kind(self) -> None:
        with pytest.raises(ValueError, match="needs kind hash or lma, got 'full'"):
            SharedMemoryEmbedding(tiny_config("full"), F, SharedMemoryLayout(100, 0))


class TestFull:
    def build(self) -> tuple[FullEmbedding, np.ndarray]:
        vocab = random_keys(0, (10,))
        emb = FullEmbedding(tiny_config("full"), F, vocab_size=10, table_buckets=8)
        tk, tv, params, report = build_table(vocab, np.arange(10), 8, 4, seed=0, max_load=1.0)
        assert report["dropped"] == 0
        emb.vocabulary.load(tk, tv, params)
        return emb, vocab

    def test_every_vocabulary_key_reads_its_row(self) -> None:
        emb, vocab = self.build()
        rows, stored = emb.vocabulary(torch.from_numpy(vocab[None]), emb.oov_rows[:1])
        assert rows.tolist() == [list(range(10))]  # vocab[3]'s two buckets coincide (both 3)
        assert stored.all()

    def test_rows_and_oov_rows(self) -> None:
        emb, vocab = self.build()
        assert emb.weight.shape == (10 + F, 4)  # vocabulary rows, then one OOV row per field
        unseen = random_keys(1, (F,))
        keys = torch.from_numpy(np.stack([vocab[[0, 5, 9]], unseen, [vocab[2], unseen[1], vocab[7]]]))
        vectors, stored = emb(keys)
        assert vectors.shape == (3, F, 4)
        rows = [[0, 5, 9], [10, 11, 12], [2, 11, 7]]
        assert torch.equal(vectors, emb.weight.detach()[torch.tensor(rows)])
        assert stored.tolist() == [[True] * 3, [False] * 3, [True, False, True]]

    def test_backward_and_torchscript(self) -> None:
        emb, vocab = self.build()
        keys = torch.from_numpy(np.stack([vocab[[0, 0, 1]], vocab[[0, 3, 4]]]))
        vectors, _ = emb(keys)
        vectors.sum().backward()
        assert emb.weight.grad is not None
        assert emb.weight.grad[:, 0].tolist() == [3, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        for a, b in zip(emb(keys), torch.jit.script(emb)(keys), strict=True):
            assert torch.equal(a, b)

    def test_memory_parts_and_kind(self) -> None:
        emb, _ = self.build()
        assert emb.memory_parts() == {"table": 13 * 4 * 4, "vocabulary_index": 8 * 4 * 16 + 48}
        with pytest.raises(ValueError, match="needs kind full, got 'hash'"):
            FullEmbedding(tiny_config("hash"), F, 10, 8)
