"""Embeddings behind one interface: ``forward(keys (B, F) int64) -> (vectors (B, F, D), stored (B, F))``.

``stored`` is True where the token had a stored entry (an LMA signature, a vocabulary row); the
servable graph sums its complement into the ``fallback_tokens`` output that feeds the server's
``lma_fallback_tokens_total`` metric.

- :class:`FullEmbedding` (``full``): one row per training token (vocabulary with a min-count, one
  OOV row per field), all fields in one table; keys reach rows through an in-graph
  :class:`~models.hashtable.StaticHashTable`.
- :class:`SharedMemoryEmbedding` (``hash`` and ``lma``): all fields share ONE 1-D float array M.
  Block t of a token's vector (``block_size`` = Z coordinates) reads row ``start_t`` of M viewed as
  (m // Z, Z), where ``start_t`` hashes the ``per_block`` = K packed values picked for block t of the
  token's signature (``num_hashes`` values of ``bits`` bits; DESIGN section 4, item 4;
  :func:`models.inthash.block_rows`). ``lma`` stores minhash signatures of sampled tokens in a static
  hash table; every other token (and every token of the ``hash`` kind, whose table is empty) gets a
  signature hashed from its key, i.e. ROBE-Z style random hashing. So ``hash`` is exactly ``lma``
  with an empty signature table. How locations are computed is versioned (``location_scheme``): a run trained with
  another scheme is refused, never reinterpreted.

Both are built from an :class:`EmbeddingConfig` plus sizes; the weights and tables are buffers, so a
safetensors state dict restores them exactly.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from models import inthash
from models.hashtable import StaticHashTable, buckets_for_bytes, table_bytes
from models.names import EMBEDDING_KINDS as KINDS
from models.names import SEMANTIC_MODES

FLOAT_BYTES = 4
# The per-block constants of inthash.block_rows, (T, 1, 1) buffers of a shared-memory embedding, in its argument order.
BLOCK_HASH_BUFFERS = ("block_mask_hi", "block_mask_lo", "block_a", "block_b", "block_c")


@dataclass
class EmbeddingConfig:
    """Everything that decides an embedding's shape and hashing. Saved in config.json and manifests.

    Args:
        kind: ``full``, ``hash`` or ``lma``.
        embedding_dim: D, the vector size per field.
        compression: for ``hash``/``lma``: full_embedding_bytes / lma_embedding_bytes, the budget
            counting M *and* the signature table.
        block_size: Z, consecutive coordinates read per block (divides embedding_dim; 0 picks
            gcd(8, embedding_dim)).
        num_hashes: packed minhash values per signature (15 in the reference).
        bits: bits per packed value (4 in the reference); num_hashes * bits <= 62.
        per_block: K, packed values combined into a block's bucket key; per_block * bits >= 32.
        signature_share: at most this share of the byte budget goes to the signature table.
        slots: slots per bucket of the signature table.
        max_load: load factor the signature table is filled to at most.
        sample_rows: rows in the uniform sample minhashes are computed from.
        semantic: ``rows`` (the paper's set of sample rows) or ``context`` (co-occurring tokens).
        min_count: a token needs this many sample occurrences for a stored signature (``lma``),
            or training occurrences for a vocabulary row (``full``).
        seed: seed of every hash parameter of the embedding.
        location_scheme: how block locations are computed (:data:`models.inthash.LOCATION_SCHEME`);
            ``hash`` and ``lma`` configs of another scheme are refused. A config without the entry was
            written before schemes were recorded: :data:`models.inthash.LEGACY_LOCATION_SCHEME`.
    """

    kind: str = "lma"
    embedding_dim: int = 16
    compression: float = 16.0
    block_size: int = 0  # 0: gcd(8, embedding_dim)
    num_hashes: int = 15
    bits: int = 4
    per_block: int = 8
    signature_share: float = 0.25
    slots: int = 4
    max_load: float = 0.9
    sample_rows: int = 125_000
    semantic: str = "rows"
    min_count: int = 1
    seed: int = 0
    location_scheme: str = inthash.LOCATION_SCHEME

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not self.compression >= 1.0:
            raise ValueError(f"compression must be >= 1, got {self.compression}")
        if self.block_size == 0:
            self.block_size = math.gcd(8, self.embedding_dim)
        if self.block_size < 1 or self.embedding_dim % self.block_size:
            raise ValueError(f"block_size must divide embedding_dim {self.embedding_dim}, got {self.block_size}")
        if not 1 <= self.bits <= 30:
            raise ValueError(f"bits must be in [1, 30], got {self.bits}")
        if self.num_hashes * self.bits > 62:
            raise ValueError(f"num_hashes * bits must be <= 62 (one int64), got {self.num_hashes}*{self.bits}")
        if not 1 <= self.per_block <= self.num_hashes:
            raise ValueError(f"per_block must be in [1, num_hashes={self.num_hashes}], got {self.per_block}")
        if self.kind != "full" and self.per_block * self.bits < 32:
            raise ValueError(
                f"per_block * bits must be >= 32 so a block has far more bucket keys than tokens,"
                f" got {self.per_block}*{self.bits}"
            )
        if self.kind != "full" and self.location_scheme != inthash.LOCATION_SCHEME:
            raise ValueError(
                f"location_scheme {self.location_scheme!r} is not supported: this build computes LMA block locations"
                f" with {inthash.LOCATION_SCHEME!r}, and a model trained with {self.location_scheme!r} would read"
                " other rows of its shared memory; retrain it with this build (or export it with a build of"
                f" {self.location_scheme!r})"
            )
        if not 0.0 <= self.signature_share < 1.0:
            raise ValueError(f"signature_share must be in [0, 1), got {self.signature_share}")
        if self.semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic must be one of {SEMANTIC_MODES}, got {self.semantic!r}")
        for name in ("min_count", "sample_rows", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.max_load <= 1.0:
            raise ValueError(f"max_load must be in (0, 1], got {self.max_load}")

    @property
    def num_blocks(self) -> int:
        return self.embedding_dim // self.block_size

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "EmbeddingConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown embedding config entries: {sorted(unknown)}")
        if "location_scheme" not in d and d.get("kind", "lma") != "full":
            d = {**d, "location_scheme": inthash.LEGACY_LOCATION_SCHEME}  # written before schemes were recorded
        return cls(**d)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SharedMemoryLayout:
    """Sizes of a shared-memory embedding: M floats and the signature table, within a byte budget."""

    memory_size: int  # m, floats in M
    table_buckets: int  # 0 for ``hash``

    @staticmethod
    def plan(config: "EmbeddingConfig", full_embedding_bytes: int) -> "SharedMemoryLayout":
        budget = full_embedding_bytes / config.compression
        seeds = seed_bytes(config)
        buckets = 0
        if config.kind == "lma":
            buckets = buckets_for_bytes(int(budget * config.signature_share), config.slots)
        table = table_bytes(buckets, config.slots)
        m = int((budget - table - seeds) // FLOAT_BYTES)
        if m < 2 * config.block_size:
            raise ValueError(
                f"compression {config.compression} leaves {m} floats of shared memory for"
                f" {full_embedding_bytes} full-embedding bytes; lower the compression"
            )
        if m > inthash.PRIME:
            raise ValueError(f"shared memory of {m} floats exceeds the hash range 2**31 - 1")
        return SharedMemoryLayout(memory_size=m, table_buckets=buckets)


def seed_bytes(config: EmbeddingConfig) -> int:
    """Bytes of the hash constants a shared-memory embedding carries beyond its table's own six: the two
    hashes of a fallback signature (a, b, c each) and, per block, the halves of its value mask and its hash."""
    return 8 * (2 * 3 + config.num_blocks * (2 + 3))


class SharedMemoryEmbedding(nn.Module):
    """``hash`` / ``lma`` embedding: blocks of one shared float array, addressed by signatures.

    Args:
        config: an :class:`EmbeddingConfig` of kind ``hash`` or ``lma``.
        num_fields: F.
        layout: sizes from :meth:`SharedMemoryLayout.plan`.

    Example::

        >>> cfg = EmbeddingConfig(kind="hash", embedding_dim=4, block_size=2, compression=2)
        >>> emb = SharedMemoryEmbedding(cfg, 3, SharedMemoryLayout.plan(cfg, 10_000))
        >>> emb(torch.tensor([[1, 2, 3]]))[0].shape
        torch.Size([1, 3, 4])
    """

    block_mask_hi: torch.Tensor
    block_mask_lo: torch.Tensor
    block_a: torch.Tensor
    block_b: torch.Tensor
    block_c: torch.Tensor
    if TYPE_CHECKING:  # for mypy only: TorchScript refuses module-typed class annotations
        signatures: StaticHashTable

    def __init__(self, config: EmbeddingConfig, num_fields: int, layout: SharedMemoryLayout) -> None:
        super().__init__()
        if config.kind not in ("hash", "lma"):
            raise ValueError(f"SharedMemoryEmbedding needs kind hash or lma, got {config.kind!r}")
        self.config = config
        self.num_fields = num_fields
        self.embedding_dim = config.embedding_dim
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks
        self.memory_size = layout.memory_size
        # Blocks are aligned: block starts are multiples of Z, i.e. rows of M viewed as (m // Z, Z).
        # One gather then copies Z floats per index instead of one (45% of the ONNX graph's time
        # before); two blocks collide with probability ~Z/m instead of ~1/m.
        self.num_starts = layout.memory_size // config.block_size
        self.rows_floats = self.num_starts * config.block_size
        self.signature_bits = config.num_hashes * config.bits

        rng = np.random.default_rng(config.seed)
        # Uniform init like DLRM's tables, scaled so a full vector has the usual norm.
        bound = 1.0 / math.sqrt(config.embedding_dim)
        self.memory = nn.Parameter(
            torch.from_numpy(rng.uniform(-bound, bound, size=layout.memory_size).astype(np.float32))
        )
        # Every hash constant is drawn from the seed and saved with the weights (a checkpoint does not
        # depend on NumPy's seed stream). A token without a stored signature gets one hashed from its key:
        # two universal hashes, its 31-bit halves (hi, lo), which the signature table computes with its
        # bucket hashes in one pass.
        fallback = inthash.draw_params(rng, 2)  # (2, 3): hi, lo
        # Block t reads K distinct packed values, chosen by a hash (seeded draw) of t, and hashes the
        # signature masked to them with its own universal hash.
        positions = np.stack(
            [rng.choice(config.num_hashes, size=config.per_block, replace=False) for _ in range(self.num_blocks)]
        )  # (T, K)
        masks = inthash.value_masks(positions, config.bits)  # (T, 2): hi, lo
        params = inthash.draw_params(rng, self.num_blocks)  # (T, 3)
        column = (self.num_blocks, 1, 1)  # block axis first: see models.inthash on the layout
        for name, values in zip(BLOCK_HASH_BUFFERS, (*masks.T, *params.T), strict=True):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(values).reshape(column)))
        self.signatures = StaticHashTable(layout.table_buckets, config.slots, extra_params=fallback)

    def block_starts(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) keys -> (B, F, T) rows of the shared memory (viewed as (m // Z, Z)), and ``stored`` (B, F)."""
        signature, stored, fallback = self.signatures.lookup(keys)  # (B, F), (B, F), 2 x (1, B, F)
        hi, lo = fallback[0], fallback[1]  # halves of the signature hashed from the key
        if self.signatures.num_buckets > 0:  # lma: a stored signature where there is one
            hi = torch.where(stored, signature // 2147483648, hi)
            lo = torch.where(stored, signature, lo)  # block_rows masks it to bits below 31: its low half
        rows = inthash.block_rows(
            hi, lo, self.block_mask_hi, self.block_mask_lo, self.block_a, self.block_b, self.block_c, self.num_starts
        )  # (T, B, F)
        return rows.permute(1, 2, 0), stored

    def forward(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts, stored = self.block_starts(keys)  # (B, F, T): row of M per block
        rows = self.memory[: self.rows_floats].view(self.num_starts, self.block_size)  # (m // Z, Z)
        vectors = rows[starts]  # (B, F, T, Z)
        # The batch as the vectors' own first dimension, not -1: ONNX Runtime reads that reshape as (0, F, D) and
        # keeps the graph's symbolic batch, without which it cannot prove that a first-order product and the Add
        # after it have one shape, and leaves them unfused (one to three nodes more a graph;
        # tests/export/test_exporter.py::test_first_order_products_fuse_into_gemm).
        return vectors.reshape(vectors.shape[0], self.num_fields, self.embedding_dim), stored  # (B, F, D)

    def memory_parts(self) -> dict[str, int]:
        return {
            "shared_memory": self.memory_size * FLOAT_BYTES,
            "signature_table": self.signatures.memory_bytes,
            "seeds": seed_bytes(self.config),
        }


class FullEmbedding(nn.Module):
    """``full`` embedding: one row per vocabulary token, one OOV row per field, one shared table.

    Args:
        config: an :class:`EmbeddingConfig` of kind ``full``.
        num_fields: F.
        vocab_size: rows for vocabulary tokens (OOV rows are added after them).
        table_buckets: buckets of the key -> row table (power of two).

    Example::

        >>> cfg = EmbeddingConfig(kind="full", embedding_dim=4)
        >>> emb = FullEmbedding(cfg, 2, vocab_size=10, table_buckets=8)
        >>> emb(torch.tensor([[1, 2]]))[0].shape
        torch.Size([1, 2, 4])
    """

    oov_rows: torch.Tensor
    if TYPE_CHECKING:  # for mypy only (see above)
        vocabulary: StaticHashTable

    def __init__(self, config: EmbeddingConfig, num_fields: int, vocab_size: int, table_buckets: int) -> None:
        super().__init__()
        if config.kind != "full":
            raise ValueError(f"FullEmbedding needs kind full, got {config.kind!r}")
        self.config = config
        self.num_fields = num_fields
        self.embedding_dim = config.embedding_dim
        self.vocab_size = vocab_size
        rng = np.random.default_rng(config.seed)
        bound = 1.0 / math.sqrt(config.embedding_dim)
        rows = vocab_size + num_fields
        self.weight = nn.Parameter(
            torch.from_numpy(rng.uniform(-bound, bound, size=(rows, config.embedding_dim)).astype(np.float32))
        )
        self.register_buffer("oov_rows", torch.arange(vocab_size, vocab_size + num_fields, dtype=torch.int64))
        self.vocabulary = StaticHashTable(table_buckets, config.slots)

    def forward(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, stored = self.vocabulary(keys, self.oov_rows)  # (B, F)
        return self.weight[rows], stored  # (B, F, D)

    def memory_parts(self) -> dict[str, int]:
        return {
            "table": int(self.weight.numel()) * FLOAT_BYTES,
            "vocabulary_index": self.vocabulary.memory_bytes,
        }
