"""Golden vectors and cross-runtime identity of the overflow-free int64 hashes (DESIGN section 4, item 5).

The same integers must come out of NumPy, eager PyTorch, TorchScript and ONNX Runtime; the golden
values below were computed once from models/inthash.py (location scheme lma-locations-v2) and pin it:
a change to any of them changes the embedding of every token of every saved model, and must come
with a new ``inthash.LOCATION_SCHEME``.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from models import inthash
from models.embeddings import BLOCK_HASH_BUFFERS, EmbeddingConfig, SharedMemoryEmbedding, SharedMemoryLayout
from models.hashtable import build_table

P = 2**31 - 1
KEYS = [0, 1, 2**31 - 1, 2**31, 2**62 - 1, 3_458_764_513_820_540_927, 1_234_567_890_123]
HASH_PARAMS = (1_103_515_245, 12_345, 2_147_483_646)
GOLDEN_HASH = [2147483646, 12344, 2147483646, 1103515244, 2147483646, 1334733923, 1819157935]

# Block rows of a (15 x 4 bits, K = 8, T = 2) layout: the packed values each block reads, its universal
# hash, and the rows of fixed signatures among 999.
SIGS = [0, 1, (1 << 60) - 1, 0x0123456789ABCDE, 994562155204313095, 582650759028425134, 2**59 + 12345]
POSITIONS = [[6, 12, 4, 10, 2, 5, 3, 11], [2, 10, 9, 13, 6, 3, 11, 0]]
BLOCK_PARAMS = [[988092274, 2084515256, 1009188549], [259758467, 151160760, 1757947972]]
NUM_STARTS = 999
GOLDEN_MASKS = [[2096640, 268435200], [31588320, 251723535]]  # (hi, lo) halves per block
GOLDEN_ROWS = [[747, 679], [747, 751], [304, 47], [687, 161], [695, 952], [870, 27], [921, 227]]

# golden_embedding() (hash kind, seed 0, 1000 rows): its constants and the rows of KEYS (every token
# falls back: its signature's halves are two hashes of its key).
GOLDEN_FALLBACK_PARAMS = [[882368599, 2098695108, 1692078040], [1376764647, 128937619, 1971188350]]
GOLDEN_EMBEDDING_MASKS = [[33431070, 251723535], [534897120, 252645135]]
GOLDEN_EMBEDDING_PARAMS = [[599756058, 291083974, 1832183913], [950029456, 1961812366, 877908628]]
GOLDEN_EMBEDDING_STARTS = [[868, 641], [825, 417], [868, 641], [14, 564], [868, 641], [253, 666], [963, 226]]


# Reference implementations in Python integers (unbounded: an int64 overflow shows as a mismatch).
def ref_hash(key: int, a: int, b: int, c: int) -> int:
    hi, lo = divmod(key, 2**31)
    return ((a * hi) % P + b * lo + c) % P


def ref_block_rows(sig: int, positions, bits: int, params, num_starts: int) -> list[int]:
    """Mask the signature to the packed values each block reads and hash the masked value's 31-bit halves."""
    out = []
    for pos_t, (a, b, c) in zip(positions, params, strict=True):
        masked = sig & sum(((1 << bits) - 1) << (bits * p) for p in pos_t)
        out.append(ref_hash(masked, a, b, c) % num_starts)
    return out


def ref_fallback_rows(key: int, fallback_params, positions, bits: int, params, num_starts: int) -> list[int]:
    """A token without a stored signature: its signature's halves are two hashes of its key."""
    hi, lo = (ref_hash(key, *p) for p in fallback_params)
    return ref_block_rows(hi * 2**31 + lo, positions, bits, params, num_starts)


def np_keys() -> np.ndarray:
    return np.array(KEYS, dtype=np.int64)


def block_args(masks, params, xp=np.asarray):  # type: ignore[no-untyped-def]
    """block_rows' (T, 1) mask halves and parameters from (T, 2) masks and (T, 3) parameters."""
    m, p = np.asarray(masks, dtype=np.int64), np.asarray(params, dtype=np.int64)
    return tuple(xp(np.ascontiguousarray(a).reshape(-1, 1)) for a in (m[:, 0], m[:, 1], p[:, 0], p[:, 1], p[:, 2]))


def embedding_positions(emb: SharedMemoryEmbedding, bits: int, num_hashes: int) -> list[list[int]]:
    """The packed values each block of ``emb`` reads, read back from its mask halves."""
    positions = []
    field = (1 << bits) - 1
    for hi, lo in zip(emb.block_mask_hi.reshape(-1).tolist(), emb.block_mask_lo.reshape(-1).tolist(), strict=True):
        mask = hi * 2**31 + lo
        kept = [(mask >> (bits * p)) & field for p in range(num_hashes)]
        assert all(v in (0, field) for v in kept)  # whole packed values, nothing else
        positions.append([p for p, v in enumerate(kept) if v])
    return positions


def embedding_params(emb: SharedMemoryEmbedding) -> list[list[int]]:
    """(T, 3): the universal hash (a, b, c) of each block of ``emb``."""
    return torch.cat([emb.block_a, emb.block_b, emb.block_c], 1).reshape(-1, 3).tolist()


class TestGolden:
    def test_hash_key(self) -> None:
        assert inthash.hash_key(np_keys(), *HASH_PARAMS).tolist() == GOLDEN_HASH
        assert [ref_hash(k, *HASH_PARAMS) for k in KEYS] == GOLDEN_HASH

    def test_key_hashes_are_hash_key_per_column(self) -> None:
        params = np.array([HASH_PARAMS, (1, 2, 3), (P - 1, P - 1, P - 1)])
        a, b, c = (params[:, i].reshape(3, 1, 1) for i in range(3))
        got = inthash.key_hashes(np_keys().reshape(7, 1), a, b, c)
        assert got.shape == (3, 7, 1)  # the hash axis first
        for h, p in enumerate(params.tolist()):
            assert got[h, :, 0].tolist() == [ref_hash(k, *p) for k in KEYS]
        assert got[0, :, 0].tolist() == GOLDEN_HASH

    def test_value_masks(self) -> None:
        masks = inthash.value_masks(np.array(POSITIONS), 4)
        assert masks.tolist() == GOLDEN_MASKS
        for (hi, lo), pos in zip(masks.tolist(), POSITIONS, strict=True):  # the halves of the K-value mask
            assert hi * 2**31 + lo == sum(15 << (4 * p) for p in pos)
            assert 0 <= hi < 2**31 and 0 <= lo < 2**31

    def test_block_rows(self) -> None:
        hi, lo = inthash.key_halves(np.array(SIGS))
        got = inthash.block_rows(hi[None], lo[None], *block_args(GOLDEN_MASKS, BLOCK_PARAMS), NUM_STARTS)
        assert got.shape == (2, 7)  # the block axis first
        assert got.T.tolist() == GOLDEN_ROWS
        assert [ref_block_rows(s, POSITIONS, 4, BLOCK_PARAMS, NUM_STARTS) for s in SIGS] == GOLDEN_ROWS

    def test_block_rows_read_only_the_chosen_values(self) -> None:
        # Changing a packed value that block t does not read leaves its row alone; changing one it reads moves it.
        def rows(sig: int) -> list[int]:
            hi, lo = inthash.key_halves(np.array([sig]))
            return inthash.block_rows(hi, lo, *block_args(GOLDEN_MASKS, BLOCK_PARAMS), NUM_STARTS)[:, 0].tolist()

        base = rows(SIGS[3])
        unread = [p for p in range(15) if p not in POSITIONS[0]]
        assert rows(SIGS[3] ^ (0b1010 << (4 * unread[0])))[0] == base[0]
        assert rows(SIGS[3] ^ (0b1010 << (4 * POSITIONS[0][0])))[0] != base[0]

    def test_halves_alias_modulo_p(self) -> None:
        # Known and harmless: a half equal to P is congruent to 0, so 0, 2**31 - 1 and 2**62 - 1 hash
        # alike under every parameter. BLAKE2b keys hit such a half with probability 2**-30.
        assert GOLDEN_HASH[0] == GOLDEN_HASH[2] == GOLDEN_HASH[4]

    def test_draw_params_stream(self) -> None:
        # Hash parameters are drawn from the seed when a model is built: pin the stream and the draws.
        assert inthash.draw_params(np.random.default_rng(0), 2).tolist() == [
            [1826701614, 1367864807, 661058651],
            [1097657232, 579362556, 87989972],
        ]
        emb = golden_embedding()
        assert emb.signatures.extra_hash_params.tolist() == GOLDEN_FALLBACK_PARAMS
        assert [[h, lo] for h, lo in zip(emb.block_mask_hi.reshape(-1).tolist(), emb.block_mask_lo.reshape(-1).tolist(),
                                        strict=True)] == GOLDEN_EMBEDDING_MASKS  # fmt: skip
        assert embedding_params(emb) == GOLDEN_EMBEDDING_PARAMS

    def test_fallback_rows(self) -> None:
        emb = golden_embedding()
        positions = embedding_positions(emb, 4, 15)
        want = [ref_fallback_rows(k, GOLDEN_FALLBACK_PARAMS, positions, 4, GOLDEN_EMBEDDING_PARAMS, 1000) for k in KEYS]
        assert want == GOLDEN_EMBEDDING_STARTS


class TestRuntimesAgree:
    def test_eager_torch(self) -> None:
        keys = torch.tensor(KEYS)
        assert inthash.hash_key(keys, *HASH_PARAMS).tolist() == GOLDEN_HASH
        hi, lo = inthash.key_halves(torch.tensor(SIGS))
        rows = inthash.block_rows(hi[None], lo[None], *block_args(GOLDEN_MASKS, BLOCK_PARAMS, torch.from_numpy),
                                  NUM_STARTS)  # fmt: skip
        assert rows.dtype == torch.int64
        assert rows.T.tolist() == GOLDEN_ROWS

    def test_torchscript_functions(self) -> None:
        keys = torch.tensor(KEYS)
        assert torch.jit.script(inthash.hash_key)(keys, *HASH_PARAMS).tolist() == GOLDEN_HASH
        a, b, c = (torch.tensor([[x]]) for x in HASH_PARAMS)
        assert torch.jit.script(inthash.key_hashes)(keys, a, b, c)[0].tolist() == GOLDEN_HASH
        hi, lo = inthash.key_halves(torch.tensor(SIGS))
        rows = torch.jit.script(inthash.block_rows)(
            hi[None], lo[None], *block_args(GOLDEN_MASKS, BLOCK_PARAMS, torch.from_numpy), NUM_STARTS
        )
        assert rows.T.tolist() == GOLDEN_ROWS

    def test_embedding_eager_and_torchscript(self) -> None:
        emb = golden_embedding()
        keys = torch.tensor(KEYS).reshape(-1, 1)  # (7, 1)
        starts, stored = emb.block_starts(keys)
        assert starts[:, 0].tolist() == GOLDEN_EMBEDDING_STARTS
        starts, stored = torch.jit.script(emb).block_starts(keys)
        assert starts[:, 0].tolist() == GOLDEN_EMBEDDING_STARTS
        assert not stored.any()

    def test_stored_signatures_read_their_block_rows(self) -> None:
        """An lma embedding with stored signatures: stored tokens read the block rows of their signature, the
        others those of the signature hashed from their key (the hash kind's rows), in eager and TorchScript."""
        cfg = EmbeddingConfig(kind="lma", embedding_dim=4, block_size=2, seed=0)
        emb = SharedMemoryEmbedding(cfg, 1, SharedMemoryLayout(memory_size=2000, table_buckets=8))
        stored_keys, sigs = np.array(KEYS[5:]), SIGS[3:5]
        tk, tv, params, _ = build_table(stored_keys, np.array(sigs), 8, cfg.slots, seed=1)
        emb.signatures.load(tk, tv, params)
        keys = torch.tensor(KEYS).reshape(-1, 1)
        positions, block = embedding_positions(emb, 4, 15), embedding_params(emb)
        want = [ref_block_rows(s, positions, 4, block, emb.num_starts) for s in sigs]
        for module in (emb, torch.jit.script(emb)):
            starts, stored = module.block_starts(keys)
            assert stored[:, 0].tolist() == [False] * 5 + [True, True]
            assert starts[:5, 0].tolist() == GOLDEN_EMBEDDING_STARTS[:5]
            assert starts[5:, 0].tolist() == want


def golden_embedding() -> SharedMemoryEmbedding:
    """The embedding whose seed-0 constants are pinned above (hash kind: every token falls back)."""
    return SharedMemoryEmbedding(
        EmbeddingConfig(kind="hash", embedding_dim=4, block_size=2, seed=0),
        1,
        SharedMemoryLayout(memory_size=2000, table_buckets=0),
    )


class LocationGraph(nn.Module):
    """What an exported LMA graph computes before its M gathers: the stored value, stored flags, block starts."""

    def __init__(self, emb: SharedMemoryEmbedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value, stored, _ = self.emb.signatures.lookup(keys)
        starts, _ = self.emb.block_starts(keys)
        return value, stored, starts


# The reference 15 x 4 bits, the paper-like 2 x 16 bits, 2 x 30 bits, and 31 x 2 bits (62-bit signatures:
# both halves full width, the largest sums).
@pytest.mark.parametrize(("num_hashes", "bits", "per_block"), [(15, 4, 8), (3, 16, 2), (2, 30, 2), (31, 2, 16)])
def test_onnx_runtime_bit_identical(tmp_path, num_hashes: int, bits: int, per_block: int) -> None:
    """Eager, TorchScript and ONNX Runtime give the same stored values and starts, stored tokens included,
    equal to the Python-integer reference."""
    cfg = EmbeddingConfig(
        kind="lma", embedding_dim=8, block_size=2, num_hashes=num_hashes, bits=bits, per_block=per_block, seed=5
    )
    emb = SharedMemoryEmbedding(cfg, 3, SharedMemoryLayout(memory_size=100_002, table_buckets=16))
    rng = np.random.default_rng(1)
    stored_keys = rng.integers(0, 2**62, size=24, dtype=np.int64)
    signatures = rng.integers(0, 2 ** (num_hashes * bits), size=24, dtype=np.int64)  # full-width signatures
    signatures[:2] = [0, 2 ** (num_hashes * bits) - 1]
    tk, tv, params, report = build_table(stored_keys, signatures, 16, cfg.slots, seed=2)
    assert report["dropped"] == 0
    emb.signatures.load(tk, tv, params)
    keys = np.concatenate([stored_keys, KEYS, rng.integers(0, 2**62, size=5, dtype=np.int64)]).reshape(-1, 3)
    graph = LocationGraph(emb).eval()

    eager = [t.numpy() for t in graph(torch.from_numpy(keys))]
    scripted = [t.numpy() for t in torch.jit.script(graph)(torch.from_numpy(keys))]
    path = tmp_path / "locations.onnx"
    torch.onnx.export(
        graph,
        (torch.from_numpy(keys[:2]),),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["keys"],
        output_names=["value", "stored", "starts"],
        dynamic_axes={"keys": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"keys": keys})

    assert eager[0].shape == (12, 3)
    assert eager[2].shape == (12, 3, 4)
    lookup = dict(zip(stored_keys.tolist(), signatures.tolist(), strict=True))
    assert eager[1].tolist() == [[k in lookup for k in row] for row in keys.tolist()]
    positions, block = embedding_positions(emb, bits, num_hashes), embedding_params(emb)
    assert all(len(p) == per_block for p in positions)
    fallback = emb.signatures.extra_hash_params.tolist()
    for i, row in enumerate(keys.tolist()):
        for j, k in enumerate(row):
            if k in lookup:
                assert eager[0][i, j] == lookup[k]
                want = ref_block_rows(lookup[k], positions, bits, block, emb.num_starts)
            else:
                assert eager[0][i, j] == -1
                want = ref_fallback_rows(k, fallback, positions, bits, block, emb.num_starts)
            assert eager[2][i, j].tolist() == want, (i, j)
    for name, got in (("torchscript", scripted), ("onnxruntime", onnx_out)):
        for want, have, output in zip(eager, got, ("value", "stored", "starts"), strict=True):
            assert have.dtype == want.dtype, (name, output)
            np.testing.assert_array_equal(have, want, err_msg=f"{name} {output}")


valid_params = st.tuples(st.integers(1, P - 1), st.integers(1, P - 1), st.integers(0, P - 1))
keys_62 = st.lists(st.integers(0, 2**62 - 1), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(keys=keys_62, params=valid_params)
def test_hash_key_never_overflows(keys: list[int], params: tuple[int, int, int]) -> None:
    got = inthash.hash_key(np.array(keys, dtype=np.int64), *params)
    assert got.tolist() == [ref_hash(k, *params) for k in keys]


@settings(max_examples=100, deadline=None)
@given(keys=keys_62, params=st.lists(valid_params, min_size=1, max_size=6))
def test_key_hashes_never_overflow(keys: list[int], params: list[tuple[int, int, int]]) -> None:
    p = np.array(params, dtype=np.int64)
    a, b, c = (p[:, i].reshape(-1, 1) for i in range(3))
    got = inthash.key_hashes(np.array(keys, dtype=np.int64), a, b, c)  # (H, N)
    assert got.T.tolist() == [[ref_hash(k, *q) for q in params] for k in keys]


@st.composite
def block_configs(draw: st.DrawFn) -> EmbeddingConfig:
    """Any shared-memory config EmbeddingConfig accepts."""
    bits = draw(st.integers(1, 30))
    per_block = draw(st.integers(-(-32 // bits), max(62 // bits, 1)))
    num_hashes = draw(st.integers(per_block, max(62 // bits, per_block)))
    try:
        return EmbeddingConfig(kind="hash", embedding_dim=4, block_size=2, num_hashes=num_hashes, bits=bits,
                               per_block=per_block, seed=draw(st.integers(0, 2**32)))  # fmt: skip
    except ValueError:
        assume(False)
        raise


@settings(max_examples=100, deadline=None)
@given(cfg=block_configs(), data=st.data(), rows=st.integers(1, 2**20))
def test_block_rows_never_overflow(cfg: EmbeddingConfig, data: st.DataObject, rows: int) -> None:
    emb = SharedMemoryEmbedding(cfg, 1, SharedMemoryLayout(memory_size=rows * cfg.block_size, table_buckets=0))
    bits = cfg.num_hashes * cfg.bits
    sigs = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=20))
    hi, lo = inthash.key_halves(np.array(sigs, dtype=np.int64))
    buffers = [getattr(emb, n).numpy()[:, 0] for n in BLOCK_HASH_BUFFERS]
    got = inthash.block_rows(hi[None], lo[None], *buffers, emb.num_starts)  # (T, N)
    positions = embedding_positions(emb, cfg.bits, cfg.num_hashes)
    assert all(len(p) == cfg.per_block for p in positions)
    want = [ref_block_rows(s, positions, cfg.bits, embedding_params(emb), emb.num_starts) for s in sigs]
    assert got.T.tolist() == want
    assert int(got.max()) < emb.num_starts
