"""The linear reference: logistic regression over the same token keys and dense features as the DLRM.

    keys  (B, F)       -> embedding of dimension 1 -> (B, F, 1) -> sum over fields -> (B, 1)
    dense (B, n_dense) -> one linear layer          -> (B, 1)   (absent when n_dense == 0, e.g. Avazu)
    logit = the two sums + a bias                               (B, 1)

One weight per token through the embeddings of :mod:`models.embeddings` at ``embedding_dim = 1``: the
reference of the studies is ``hash`` at compression 1 (hashed, as many weights as training tokens),
but ``full`` (exactly one weight per vocabulary token) and ``lma`` work the same way. It is trained,
evaluated, exported and served by the same code as the DLRM: :class:`models.dlrm.CTRModel` wraps it
and returns the graph outputs of every bundle.

Example::

    >>> from models.dlrm import CTRModel, build_embedding
    >>> from models.embeddings import EmbeddingConfig
    >>> emb_cfg = EmbeddingConfig(kind="hash", embedding_dim=1, compression=1)
    >>> lr = LogisticRegression(LinearConfig(2, 3), build_embedding(emb_cfg, 3, 400))
    >>> CTRModel(lr)(torch.zeros(4, 2), torch.arange(12).reshape(4, 3))[0].shape
    torch.Size([4, 1])
"""

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from models.embeddings import FLOAT_BYTES, EmbeddingConfig

ARCHITECTURE = "lr"


def reference_embedding(seed: int) -> EmbeddingConfig:
    """The linear reference's embedding: ``hash`` at 1x, dimension 1 (as many hashed weights as training tokens).

    What ``--model lr`` trains by default and what a DLRM's linear part (``DLRMConfig.linear``) is built
    with, so that the DLRM's first training stage is exactly the reference's training.
    """
    return EmbeddingConfig(kind="hash", embedding_dim=1, compression=1.0, seed=seed)


def reference_bytes(distinct_tokens: int) -> int:
    """``full_embedding_bytes`` of a dimension-1 embedding: one float per distinct training token."""
    return distinct_tokens * FLOAT_BYTES


@dataclass
class LinearConfig:
    """Shapes of the linear reference (it has no hidden layers)."""

    num_dense: int
    num_fields: int

    def __post_init__(self) -> None:
        if self.num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {self.num_fields}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")

    @property
    def embedding_dim(self) -> int:
        return 1

    def to_dict(self) -> dict[str, object]:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "LinearConfig":
        d = dict(d)
        if d.pop("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"not a linear-reference config: {d}")
        names = {f.name for f in fields(cls)}
        if set(d) - names:
            raise ValueError(f"unknown linear model config entries: {sorted(set(d) - names)}")
        return cls(**d)  # type: ignore[arg-type]


class LogisticRegression(nn.Module):
    """Sum of one weight per token (an embedding of dimension 1) + a linear layer on the dense features + bias.

    Forward has the DLRM's signature: ``(dense (B, n_dense), keys (B, F)) -> (logit (B, 1), stored (B, F))``.
    All weights start at zero (a logistic regression has no symmetry to break; the embeddings' own
    uniform init would start every row at a logit of a sum of F random terms).
    """

    def __init__(self, config: LinearConfig, embedding: nn.Module) -> None:
        super().__init__()
        if embedding.embedding_dim != 1 or embedding.num_fields != config.num_fields:
            raise ValueError(
                f"the linear reference needs an embedding of dimension 1 with {config.num_fields} fields,"
                f" got dimension {embedding.embedding_dim} with {embedding.num_fields} fields"
            )
        self.config = config
        self.has_dense = config.num_dense > 0
        self.embedding = embedding
        self.dense = nn.Linear(config.num_dense, 1, bias=False) if self.has_dense else nn.Sequential()
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("field_sum", torch.ones(config.num_fields, 1), persistent=False)  # see forward
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def forward(self, dense: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit (B, 1), stored (B, F))."""
        weights, stored = self.embedding(keys)  # (B, F, 1), (B, F)
        # The sum over fields as a product with ones. ONNX Runtime's matrix product adds a row's terms in one order
        # whatever the batch and wherever the row sits in memory, so a score is the same alone or in any batch;
        # its ReduceSum is not (a batch of 1 takes a vectorized path, and so does any row sum over the last
        # axis, whose order then follows the row's alignment), and it was 3.6x slower on (256, 26, 1).
        logit = weights.flatten(1) @ self.field_sum + self.bias  # (B, 1)
        if self.has_dense:
            logit = logit + self.dense(dense)  # (B, 1)
        return logit, stored
