"""Golden integer equality: the same table lookups and block locations from NumPy, eager PyTorch,
TorchScript and ONNX Runtime (DESIGN section 4, item 5).

The NumPy side is an independent reference written here from the hashtable/inthash definitions
(two candidate buckets, full-key compare, at most one hit per key), so a lookup bug shared by
every exported graph is caught too, not only a disagreement between runtimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from torch import nn

from export.onnx_runtime import cpu_session
from models import inthash
from models.embeddings import BLOCK_HASH_BUFFERS
from models.hashtable import StaticHashTable, bucket_hashes
from models.schema import KEY_MASK

if TYPE_CHECKING:
    from conftest import TinyRun


def numpy_lookup(table: StaticHashTable, keys: np.ndarray, default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference lookup: (value, found) of every key; ``default`` where absent."""
    table_keys, table_values = table.table_keys.numpy(), table.table_values.numpy()
    b1, b2 = bucket_hashes(keys, table.params, table.bucket_mask)
    value = np.broadcast_to(default, keys.shape).copy()
    found = np.zeros(keys.shape, dtype=bool)
    for buckets in (b1, b2):
        hit = table_keys[buckets] == keys[..., None]  # (..., S)
        has = hit.any(-1) & ~found
        slot = hit.argmax(-1)
        value[has] = table_values[buckets, slot][has]
        found |= has
    return value, found


class BlockStarts(nn.Module):
    """The LMA locations alone: keys (B, F) -> start offsets (B, F, T), stored (B, F)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding.block_starts(keys)


class VocabularyRows(nn.Module):
    """The full embedding's key -> row lookup alone: keys (B, F) -> rows (B, F), stored (B, F)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding.vocabulary(keys, self.embedding.oov_rows)


def _all_runtimes(module: nn.Module, keys: np.ndarray, tmp_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    module.eval()
    k = torch.from_numpy(keys)
    scripted = torch.jit.script(module)
    path = tmp_path / "part.onnx"
    torch.onnx.export(
        module, (k[:2],), str(path), input_names=["keys"], output_names=["out", "stored"],
        dynamic_axes={"keys": {0: "batch"}}, opset_version=18, dynamo=False,
    )  # fmt: skip
    with torch.inference_mode():
        eager = tuple(t.numpy() for t in module(k))
        ts = tuple(t.numpy() for t in scripted(k))
    ort = tuple(cpu_session(path, threads=1).run(None, {"keys": keys}))
    return {"eager": eager, "torchscript": ts, "onnx": ort}  # type: ignore[dict-item]


def _keys(run: TinyRun, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, KEY_MASK, size=(batch, run.cfg.schema.num_fields), dtype=np.int64, endpoint=True)
    pick = rng.random(keys.shape) < 0.5
    keys[pick] = rng.choice(run.known_keys, size=int(pick.sum()))
    keys[0, :3] = [0, KEY_MASK, run.known_keys[0]]
    return keys


def test_lma_block_locations_are_identical_everywhere(tiny_runs: dict[str, TinyRun], tmp_path: Path) -> None:
    run = tiny_runs["lma"]
    emb = run.model.dlrm.embedding
    keys = _keys(run, 64, seed=7)
    # Reference in NumPy: the stored signature, or the one hashed from the key (halves = two key hashes);
    # block t hashes the signature's halves masked to the packed values it reads.
    sig, stored = numpy_lookup(emb.signatures, keys, np.int64(-1))
    fb_hi, fb_lo = (inthash.hash_key(keys, *p) for p in emb.signatures.extra_hash_params.tolist())
    hi = np.where(stored, sig // 2**31, fb_hi)
    lo = np.where(stored, sig & (2**31 - 1), fb_lo)
    block = [getattr(emb, n).numpy() for n in BLOCK_HASH_BUFFERS]
    starts = inthash.block_rows(hi, lo, *block, emb.num_starts).transpose(1, 2, 0)  # (T, B, F) -> (B, F, T)
    assert starts.shape == (64, run.cfg.schema.num_fields, emb.num_blocks)
    assert starts.min() >= 0 and starts.max() < emb.num_starts
    np.testing.assert_array_equal(stored, np.isin(keys, run.known_keys))
    for runtime, (got_starts, got_stored) in _all_runtimes(BlockStarts(emb), keys, tmp_path).items():
        np.testing.assert_array_equal(got_stored, stored, err_msg=runtime)
        np.testing.assert_array_equal(got_starts, starts, err_msg=runtime)


def test_full_vocabulary_rows_are_identical_everywhere(tiny_runs: dict[str, TinyRun], tmp_path: Path) -> None:
    run = tiny_runs["full"]
    emb = run.model.dlrm.embedding
    keys = _keys(run, 64, seed=8)
    rows, stored = numpy_lookup(emb.vocabulary, keys, emb.oov_rows.numpy())
    # the vocabulary of the tiny run is ``known_keys`` in row order
    row_of = {int(k): i for i, k in enumerate(run.known_keys)}
    expected = np.array([[row_of.get(int(k), emb.vocab_size + f) for f, k in enumerate(r)] for r in keys])
    np.testing.assert_array_equal(rows, expected)
    for runtime, (got_rows, got_stored) in _all_runtimes(VocabularyRows(emb), keys, tmp_path).items():
        np.testing.assert_array_equal(got_stored, stored, err_msg=runtime)
        np.testing.assert_array_equal(got_rows, expected, err_msg=runtime)


@pytest.mark.parametrize("bits", [4, 16])
def test_block_rows_golden_values(bits: int) -> None:
    """Pinned block rows of fixed signatures and hash constants (NumPy and eager agree), written out by hand."""
    sig = np.array([0, 1, 0x0123456789ABCDE, (1 << 60) - 1], dtype=np.int64)
    positions = np.array([[0, 1], [2, 3]], dtype=np.int64)
    masks = inthash.value_masks(positions, bits)  # (T, 2): hi, lo
    params = np.array([[12345, 2147483646, 7], [1, 999331, 2147483000]], dtype=np.int64)
    num_starts = 1000
    columns = [np.ascontiguousarray(a).reshape(2, 1) for a in (masks[:, 0], masks[:, 1], *params.T)]
    hi, lo = sig // 2**31, sig & (2**31 - 1)
    got = inthash.block_rows(hi[None], lo[None], *columns, num_starts).T  # (4, T)
    field = (1 << bits) - 1  # written out: mask the two values of the block, split in halves, linear hash mod P
    masked = sig[:, None] & np.array([[(field << (bits * p)) for p in row] for row in positions]).sum(-1)  # (4, 2)
    expected = ((masked // 2**31) * params[:, 0] + (masked % 2**31) * params[:, 1] + params[:, 2]) % (2**31 - 1)
    np.testing.assert_array_equal(got, expected % num_starts)
    eager = inthash.block_rows(
        torch.from_numpy(hi[None]), torch.from_numpy(lo[None]), *(torch.from_numpy(c) for c in columns), num_starts
    )
    np.testing.assert_array_equal(eager.numpy().T, expected % num_starts)
    golden = {4: [[7, 0], [6, 0], [432, 487], [399, 623]], 16: [[7, 0], [6, 0], [840, 445], [352, 263]]}
    np.testing.assert_array_equal(got, golden[bits])
