"""Server settings: environment variables with the prefix ``LMA_``, validated before anything starts.

Every field below is read from ``LMA_<FIELD>`` (``LMA_MODEL_DIR``, ``LMA_MAX_BATCH_SIZE``, ...);
keyword arguments override the environment. :func:`load_settings` turns pydantic's validation
errors into one :class:`ValueError` whose message names each offending variable, so ``lma serve``
refuses to start with a line like ``LMA_MAX_BATCH_SIZE: must be >= 1 (got 0)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.cores import available_cores

ENV_PREFIX = "LMA_"


class Settings(BaseSettings):
    """What the server reads at start-up (DESIGN section 7). Times are in the unit their name says."""

    # allow_inf_nan=False: "inf" passes gt=0, and a deadline of inf broke /openapi.json (not JSON) after start-up
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=(), allow_inf_nan=False
    )

    # models
    model_dir: Path = Field(Path("artifacts"), description="one bundle, or a repository of <name>/<version>/ bundles")
    default_model: str = Field("", description="model of POST /v1/predict (empty: the first name in sorted order)")
    runtime: Literal["onnx", "torchscript"] = "onnx"  # export.contract.RUNTIMES (a test checks they agree)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = Field(0, ge=0, description="threads of one inference (0: the cores per worker)")
    workers: int = Field(0, ge=0, description="server processes on one port (0: one per core the server may use)")
    backlog: int = Field(1024, ge=16, description="listen backlog of each worker's socket")
    watch_interval_s: float = Field(5.0, ge=0, description="poll the model repository this often (0: never)")
    # batching and admission
    # le: a sanity bound (an extra zero or two), not a memory budget: start-up warms the runtime at this size, and
    # 10**8 rows ran out of memory 25 s into it; a batch of 65,536 rows is far past where batching stops paying
    max_batch_size: int = Field(256, ge=1, le=65536, description="samples per runtime call (at most 65536)")
    # 0 measured best on 2 cores (docs/BENCHMARKS.md): 2.2x the single-sample requests/s of 2 ms at 16 connections,
    # and more samples/s for 32-sample requests; batches still form while the runtime is busy.
    max_wait_ms: float = Field(0.0, ge=0, description="longest a queued request waits for a fuller batch")
    max_queue: int = Field(2048, ge=1, description="requests waiting per model before 503")
    request_timeout_ms: float = Field(2000.0, gt=0, description="deadline of a request from arrival; 504 after")
    max_queue_delay_ms: float = Field(
        100.0, ge=0, description="longest predicted wait a request is admitted with, whatever its deadline (0: none)"
    )
    max_instances_per_request: int = Field(1024, ge=1, description="instances of one request before 413")
    max_body_bytes: int = Field(16 << 20, ge=1024, description="request body bytes before 413")
    drain_timeout_s: float = Field(30.0, gt=0, description="how long a replaced model may take to finish its work")
    # feature store and update channel
    redis_url: str = Field("", description="redis://host:port/db; empty: in-memory feature store, folder watch")
    feature_store_path: Path | None = Field(None, description="JSON or CSV file loaded into the in-memory store")
    feature_store_timeout_ms: float = Field(50.0, gt=0, description="deadline of one feature-store fetch")
    feature_store_prefix: str = Field(
        "lma:features:", min_length=1, description="key prefix of the entity hashes in Redis"
    )
    # model signatures
    trusted_keys: Annotated[tuple[Path, ...], NoDecode] = Field(
        (), description="comma-separated PEM public keys; set: load only bundles one of them signed (empty: no check)"
    )
    # operations
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin routes (unset: disabled)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one JSON log line per request")
    gc_threshold: int = Field(
        10_000, ge=0, description="allocations between collections of the youngest generation (server/heap.py; 0: off)"
    )

    @field_validator("runtime", "device", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"{v} is not a directory (a bundle or a repository of <name>/<version>/ bundles)")
        return v

    @field_validator("feature_store_path")
    @classmethod
    def _feature_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a file")
        if v is not None and v.suffix.lower() not in (".json", ".csv"):
            raise ValueError(f"{v}: the in-memory feature store reads .json or .csv files")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        v = v.strip()
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix:// (got {v!r}); leave it empty for no Redis")
        try:
            urlsplit(v).port  # noqa: B018 (parsing is the check: redis-py would fail on it only when it connects)
        except ValueError as e:
            raise ValueError(f"{e} (the URL's port must be a number)") from None
        return v

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_key_list(cls, v: object) -> object:
        if isinstance(v, str):  # LMA_TRUSTED_KEYS=/keys/2025.pub,/keys/2026.pub
            return tuple(part.strip() for part in v.split(",") if part.strip())
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _keys_are_usable(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        from export.signing import check_public_key_file

        for path in v:
            check_public_key_file(path)  # KeyFileError (a ValueError) naming the file and what is wrong
        return v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, v: object) -> object:
        return None if v in ("", None) else v

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None


def worker_count(settings: Settings) -> int:
    """``LMA_WORKERS``, or one worker per available core (what docs/BENCHMARKS.md measured best)."""
    return settings.workers or available_cores()


def runtime_threads(settings: Settings) -> int:
    """Intra-op threads of one runtime: ``LMA_INTRA_OP_THREADS``, else the available cores shared by the workers."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    return max(1, available_cores() // worker_count(settings))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def describe_validation_error(e: ValidationError) -> str:
    """One line per error, each naming the environment variable: ``LMA_RUNTIME: Input should be ...``."""
    lines = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        suffix = f" (got {shown!r})" if err["type"] != "value_error" and not isinstance(shown, dict) else ""
        lines.append(f"{env_name(field)}: {msg}{suffix}")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus ``overrides``; bad values raise one clear :class:`ValueError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ValueError(f"invalid server settings: {describe_validation_error(e)}") from None
