"""Run folders: ``model.safetensors`` (weights and tables, never pickle) + ``config.json``.

``config.json`` holds everything needed to rebuild the model with empty tables of the right shape
(feature schema, DLRM config, embedding config, sizes); the weights then fill them exactly.
:func:`memory_accounting` is the one implementation of DESIGN section 4's honest memory numbers,
used by training, export and the server alike.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models import linear
from models.dlrm import DLRM, CTRModel, DLRMConfig, build_embedding
from models.embeddings import FLOAT_BYTES, EmbeddingConfig, FullEmbedding, SharedMemoryEmbedding
from models.linear import LinearConfig, LogisticRegression
from models.schema import FeatureSchema

RUN_FORMAT = "lma-run/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class RunConfig:
    """What a run folder's config.json holds."""

    schema: FeatureSchema
    model: DLRMConfig | LinearConfig  # the network's shapes; its "architecture" entry says which
    embedding: EmbeddingConfig
    full_embedding_bytes: int  # distinct training tokens x D x 4
    distinct_tokens: int
    vocab_size: int = 0  # full kind only
    table_buckets: int = 0  # full kind only (vocabulary index)
    data_format: str = "criteo"
    extra: dict[str, Any] = field(default_factory=dict)  # training settings, data statistics, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "schema": self.schema.to_dict(),
            "model": self.model.to_dict(),
            "embedding": self.embedding.to_dict(),
            "sizes": {
                "full_embedding_bytes": self.full_embedding_bytes,
                "distinct_tokens": self.distinct_tokens,
                "vocab_size": self.vocab_size,
                "table_buckets": self.table_buckets,
            },
            "data_format": self.data_format,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if d.get("format") != RUN_FORMAT:
            raise ValueError(f"config format {d.get('format')!r} is not {RUN_FORMAT!r}")
        known = {"format", "schema", "model", "embedding", "sizes", "data_format"}

        def entry(name: str, parse: Any) -> Any:  # an error names the entry it came from
            if not isinstance(d.get(name), dict):
                raise ValueError(f"'{name}' must be an object, got {type(d.get(name)).__name__}")
            try:
                return parse(d[name])
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"'{name}': {e}") from None

        def sizes(s: dict[str, Any]) -> dict[str, int]:
            return {
                "full_embedding_bytes": int(s["full_embedding_bytes"]),
                "distinct_tokens": int(s["distinct_tokens"]),
                "vocab_size": int(s.get("vocab_size", 0)),
                "table_buckets": int(s.get("table_buckets", 0)),
            }

        return cls(
            schema=entry("schema", FeatureSchema.from_dict),
            model=entry("model", model_config_from_dict),
            embedding=entry("embedding", EmbeddingConfig.from_dict),
            **entry("sizes", sizes),
            data_format=str(d.get("data_format", "criteo")),
            extra={k: v for k, v in d.items() if k not in known},
        )


def model_config_from_dict(d: dict[str, Any]) -> DLRMConfig | LinearConfig:
    """The network config of ``config.json``'s ``model`` entry (no ``architecture``: a DLRM, as before it existed)."""
    if not isinstance(d, dict):
        raise ValueError(f"model config must be an object, got {type(d).__name__}")
    arch = d.get("architecture", "dlrm")
    if arch == linear.ARCHITECTURE:
        return LinearConfig.from_dict(d)
    if arch == "dlrm":
        return DLRMConfig.from_dict(d)
    raise ValueError(f"unknown model architecture {arch!r}; this build knows 'dlrm' and {linear.ARCHITECTURE!r}")


def build_model(cfg: RunConfig) -> CTRModel:
    """A model with the config's shapes (weights initialised, tables empty until loaded)."""
    embedding = build_embedding(
        cfg.embedding, cfg.model.num_fields, cfg.full_embedding_bytes, cfg.vocab_size, cfg.table_buckets
    )
    if isinstance(cfg.model, LinearConfig):
        return CTRModel(LogisticRegression(cfg.model, embedding))
    part = None
    if cfg.model.linear:  # the linear reference's own embedding, seeded as the run's
        part_embedding = build_embedding(
            linear.reference_embedding(cfg.embedding.seed),
            cfg.model.num_fields,
            linear.reference_bytes(cfg.distinct_tokens),
        )
        part = LogisticRegression(LinearConfig(cfg.model.num_dense, cfg.model.num_fields), part_embedding)
    return CTRModel(DLRM(cfg.model, embedding, part))


def save_run(run_dir: Path, model: CTRModel, cfg: RunConfig) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(run_dir / WEIGHTS_FILE)  # never leave a half-written checkpoint behind
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def load_run(run_dir: Path) -> tuple[CTRModel, RunConfig]:
    """Rebuild the model of a run folder from config.json and model.safetensors (eval mode)."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder: {name} is missing")
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    try:
        raw = json.loads(config_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        cfg = RunConfig.from_dict(raw)
    except KeyError as e:
        raise ValueError(f"{config_path}: missing entry {e}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    model = build_model(cfg)
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{weights_path} does not hold the weights {CONFIG_FILE} describes: {e}") from e
    model.eval()
    return model, cfg


def memory_accounting(model: CTRModel, full_embedding_bytes: int) -> dict[str, Any]:
    """DESIGN section 4: full vs this model's embedding bytes, dense bytes, both compressions.

    ``embedding_bytes`` counts every byte the embedding carries: for ``hash``/``lma`` the shared
    memory, the whole signature table (keys, values, empty slots) and the hash seeds; for ``full``
    its table and its in-graph vocabulary index; and a DLRM's linear part's per-token weights and
    their hash seeds (``linear_weights``): they are per-token memory, so the compression counts them.
    """
    emb: FullEmbedding | SharedMemoryEmbedding = model.dlrm.embedding  # type: ignore[assignment]
    parts = {k: int(v) for k, v in emb.memory_parts().items()}
    per_token: tuple[str, ...] = ("dlrm.embedding.",)
    part = getattr(model.dlrm, "linear", None)
    if part is not None:
        part_emb: SharedMemoryEmbedding = part.embedding
        parts["linear_weights"] = int(sum(part_emb.memory_parts().values()))
        per_token += ("dlrm.linear.embedding.",)
    embedding_bytes = sum(parts.values())
    dense_bytes = sum(p.numel() * FLOAT_BYTES for n, p in model.named_parameters() if not n.startswith(per_token))
    return {
        "kind": emb.config.kind,
        "full_embedding_bytes": int(full_embedding_bytes),
        "embedding_bytes": embedding_bytes,
        "embedding_parts": parts,
        "dense_bytes": int(dense_bytes),
        "total_bytes": embedding_bytes + int(dense_bytes),
        "embedding_compression": full_embedding_bytes / embedding_bytes,
        "model_compression": (full_embedding_bytes + dense_bytes) / (embedding_bytes + dense_bytes),
    }
