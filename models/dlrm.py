"""DLRM over any embedding of :mod:`models.embeddings`, and the servable wrapper of every network.

    dense (B, n_dense) -> bottom MLP -> (B, D)           (absent when n_dense == 0, e.g. Avazu)
    keys  (B, F)       -> embedding  -> (B, F, D)
    pairwise dot products of the F (+1) vectors, upper triangle -> concat bottom output
    -> top MLP -> one logit; sigmoid gives the click probability.
    linear part (``linear``): + the logit of a logistic regression over the same keys and dense values
    first-order terms (``first_order``, run folders of before): + sum over fields of w_f . e_f + a linear layer on dense

The linear part is the linear reference of :mod:`models.linear` inside the DLRM: one hashed weight per
token (``hash`` at 1x, dimension 1, counted in the memory accounting) plus a linear layer on the dense
values and a bias. The top MLP's last layer starts at zero, so an initialised DLRM *is* its linear part,
and training runs in two stages (:mod:`models.train`): the linear part alone first, exactly as
``--model lr`` trains, then everything from that stage's best validation point. The best validation
over both stages is kept, so the DLRM cannot end below the linear reference's validation AUC, which on
small data (a few thousand rows, where a DLRM overfits within an epoch) it did before (docs/RESULTS.md,
"DLRM against the linear reference"). Embeddings are initialised at a tenth of their usual scale
(``embedding_init``: rare tokens start near zero instead of adding random dot products).

The first-order terms (zero at init; a learned w_f . e_f per field and a linear dense term, no memory
per token) were the recipe before the linear part; run folders with them, or with neither (their config
has none of these entries), load as they were trained.

:class:`CTRModel` is the whole servable model around a network (this DLRM, or the linear reference of
:mod:`models.linear`): it takes the graph inputs of every bundle (``dense`` float32 (B, n_dense),
already ``log1p``-transformed by :func:`models.schema.transform_dense`, and ``keys`` int64 (B, F)) and
returns the two graph outputs ``probability`` float32 (B, 1) and ``fallback_tokens`` int64 (B,).
"""

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.embeddings import (
    EmbeddingConfig,
    FullEmbedding,
    SharedMemoryEmbedding,
    SharedMemoryLayout,
)
from models.linear import LogisticRegression

ARCHITECTURE = "dlrm"
PRESETS: dict[str, dict[str, object]] = {
    # name: embedding_dim, bottom hidden layers (the last layer -> embedding_dim is added), top hidden
    "tiny": {"embedding_dim": 4, "bottom": [8], "top": [8]},
    "small": {"embedding_dim": 16, "bottom": [64, 32], "top": [64, 32]},
    "criteo-kaggle": {"embedding_dim": 16, "bottom": [512, 256, 64], "top": [512, 256]},
}


@dataclass
class DLRMConfig:
    """MLP sizes. ``bottom`` hidden sizes end in a layer to ``embedding_dim``; ``top`` ends in 1."""

    num_dense: int
    num_fields: int
    embedding_dim: int
    bottom: list[int]
    top: list[int]
    first_order: bool = False
    embedding_init: float = 1.0  # scale applied to the embedding's own initial values
    linear: bool = False  # a linear reference inside (models.linear), trained first

    def __post_init__(self) -> None:
        if not self.embedding_init > 0:
            raise ValueError(f"embedding_init must be positive, got {self.embedding_init}")
        if self.num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {self.num_fields}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        if any(h < 1 for h in [*self.bottom, *self.top]):
            raise ValueError(f"layer sizes must be >= 1, got bottom={self.bottom} top={self.top}")

    @classmethod
    def from_preset(
        cls, preset: str, num_dense: int, num_fields: int, embedding_dim: int | None = None
    ) -> "DLRMConfig":
        """A preset's sizes with first-order terms and 0.1x embedding init: a network that needs no
        per-token table of its own. Training swaps the first-order terms for the linear part
        (``linear``, built with the run's token count) unless ``--no-linear-part``."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        p = PRESETS[preset]
        return cls(
            num_dense=num_dense,
            num_fields=num_fields,
            embedding_dim=int(embedding_dim or p["embedding_dim"]),  # type: ignore[call-overload]
            bottom=list(p["bottom"]),  # type: ignore[call-overload]
            top=list(p["top"]),  # type: ignore[call-overload]
            first_order=True,
            embedding_init=0.1,
        )

    def to_dict(self) -> dict[str, object]:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "DLRMConfig":
        d = dict(d)
        if d.pop("architecture", ARCHITECTURE) != ARCHITECTURE:  # run folders before the linear reference have none
            raise ValueError(f"not a DLRM config: {d}")
        names = {f.name for f in fields(cls)}
        if set(d) - names:
            raise ValueError(f"unknown model config entries: {sorted(set(d) - names)}")
        return cls(**d)  # type: ignore[arg-type]


def mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.jit.unused
def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, out of TorchScript's sight (it cannot compile the import inside)."""
    return torch.onnx.is_in_onnx_export()


class DotInteraction(nn.Module):
    """Upper triangle (no diagonal) of the pairwise dot products of N vectors."""

    flat_index: torch.Tensor

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("flat_index", rows * num_vectors + cols)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(vectors, vectors.transpose(1, 2))  # (B, N, N)
        # (B, N*N). An ONNX Flatten keeps the graph's symbolic batch; a reshape to (vectors.shape[0], N*N) lost it
        # where the vectors come straight from the embedding (no dense features), and with it the fusion of the
        # first-order product with its Add (models.embeddings.SharedMemoryEmbedding.forward).
        flat = gram.flatten(1)
        if not torch.jit.is_scripting() and _in_onnx_export():
            # The same values, gathered as rows: ONNX Runtime's Gather along axis 1 copies one float at a
            # time, along axis 0 one contiguous row of B floats per pair, and the two transposes cost less
            # than the difference. PyTorch is the other way round (the row gather of a transposed view is
            # slower there, its backward most), so eager and TorchScript keep the column gather.
            # docs/EXPORT.md ("The DLRM interaction, gathered as rows") has the timings.
            return flat.t()[self.flat_index].t()  # (B, N*(N-1)/2)
        return flat[:, self.flat_index]  # (B, N*(N-1)/2)


class DLRM(nn.Module):
    """Bottom MLP + embedding + dot interaction + top MLP (+ linear part, + first-order terms) -> logit (B, 1).

    ``linear_part``: a :class:`models.linear.LogisticRegression` over the same inputs (the attribute
    ``linear``); given exactly when ``config.linear``.
    """

    first_order_weight: torch.Tensor

    def __init__(self, config: DLRMConfig, embedding: nn.Module, linear_part: LogisticRegression | None = None) -> None:
        super().__init__()
        if config.linear != (linear_part is not None):
            raise ValueError(
                "a DLRM with a linear part needs its LogisticRegression, and one without takes none"
                f" (config.linear={config.linear}, linear part given: {linear_part is not None})"
            )
        if linear_part is not None and (
            linear_part.config.num_fields != config.num_fields or linear_part.config.num_dense != config.num_dense
        ):
            raise ValueError(
                f"linear part ({linear_part.config.num_fields} fields, {linear_part.config.num_dense} dense) does not"
                f" match the model config ({config.num_fields} fields, {config.num_dense} dense)"
            )
        if embedding.embedding_dim != config.embedding_dim or embedding.num_fields != config.num_fields:
            raise ValueError(
                f"embedding (dim {embedding.embedding_dim}, {embedding.num_fields} fields) does not match"
                f" the model config (dim {config.embedding_dim}, {config.num_fields} fields)"
            )
        self.config = config
        self.num_dense = config.num_dense
        self.has_dense = config.num_dense > 0
        d = config.embedding_dim
        self.bottom = (
            mlp([config.num_dense, *config.bottom, d], final_activation=True) if self.has_dense else nn.Sequential()
        )
        self.embedding = embedding
        n = config.num_fields + (1 if self.has_dense else 0)
        self.interaction = DotInteraction(n)
        top_in = n * (n - 1) // 2 + (d if self.has_dense else 0)
        self.top = mlp([top_in, *config.top, 1], final_activation=False)
        self.first_order = config.first_order
        if config.first_order:
            self.first_order_weight = nn.Parameter(torch.zeros(config.num_fields, d))  # (F, D)
            self.dense_linear: nn.Module = nn.Sequential()
            if self.has_dense:
                linear = nn.Linear(config.num_dense, 1, bias=False)
                nn.init.zeros_(linear.weight)
                self.dense_linear = linear
        else:  # placeholders TorchScript can compile in the branch never taken; not in the state dict
            self.register_buffer("first_order_weight", torch.zeros(0), persistent=False)
            self.dense_linear = nn.Sequential()
        if config.embedding_init != 1.0:
            with torch.no_grad():
                for p in embedding.parameters():
                    p.mul_(config.embedding_init)
        self.linear = linear_part
        if linear_part is not None:  # the deep part adds exactly 0 until training moves this layer
            last = self.top[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, dense: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit (B, 1), stored (B, F))."""
        emb, stored = self.embedding(keys)  # (B, F, D), (B, F)
        if self.has_dense:
            x = self.bottom(dense)  # (B, D)
            vectors = torch.cat([x.unsqueeze(1), emb], dim=1)  # (B, F+1, D)
            features = torch.cat([x, self.interaction(vectors)], dim=1)  # (B, D + pairs)
        else:
            features = self.interaction(emb)  # (B, pairs)
        logit = self.top(features)  # (B, 1)
        if self.linear is not None:
            logit = logit + self.linear(dense, keys)[0]  # (B, 1)
        if self.first_order:
            # sum over fields of w_f . e_f as one matrix product: batch-invariant in ONNX Runtime (models/linear.py)
            logit = logit + emb.flatten(1) @ self.first_order_weight.reshape(-1, 1)  # (B, 1)
            if self.has_dense:
                logit = logit + self.dense_linear(dense)  # (B, 1)
        return logit, stored


class CTRModel(nn.Module):
    """The servable graph around a network: a :class:`DLRM` or :class:`models.linear.LogisticRegression`.

    Inputs: ``dense`` float32 (B, n_dense) (log1p-transformed), ``keys`` int64 (B, F).
    Outputs: ``probability`` float32 (B, 1) and ``fallback_tokens`` int64 (B,), the number of the
    row's tokens without a stored signature / vocabulary row (served as a metric).

    The network is the attribute ``dlrm`` whatever its architecture: the name is part of the weight
    names of every run folder (``dlrm.embedding.memory``, ...), and the exporter reaches the embedding
    as ``model.dlrm.embedding``. A network has ``embedding`` and ``forward(dense, keys) -> (logit (B, 1),
    stored (B, F))``.
    """

    if TYPE_CHECKING:  # for mypy only: TorchScript refuses module-typed class annotations
        dlrm: DLRM | LogisticRegression

    def __init__(self, dlrm: DLRM | LogisticRegression) -> None:
        super().__init__()
        self.dlrm = dlrm

    def forward(self, dense: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, stored = self.dlrm(dense, keys)
        return torch.sigmoid(logit), (~stored).sum(1)


def build_embedding(
    config: EmbeddingConfig,
    num_fields: int,
    full_embedding_bytes: int,
    vocab_size: int = 0,
    table_buckets: int = 0,
) -> nn.Module:
    """The embedding a config describes, with empty tables of the right shapes.

    ``full`` needs ``vocab_size`` and ``table_buckets`` (from the vocabulary build);
    ``hash``/``lma`` derive their sizes from ``full_embedding_bytes`` and the compression.
    """
    if config.kind == "full":
        return FullEmbedding(config, num_fields, vocab_size, table_buckets)
    return SharedMemoryEmbedding(config, num_fields, SharedMemoryLayout.plan(config, full_embedding_bytes))
