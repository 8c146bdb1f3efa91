"""Synthetic Criteo-format data whose labels come from a documented latent structure.

    lma synth --rows 1000000 --out data/synth.tsv.gz --seed 0

The generative model is specified in docs/DATA.md ("Synthetic data"); :class:`SynthParams` holds
its parameters with the values documented there. In short: every row belongs to a latent cluster;
each field draws its token from the cluster's own token list with probability ``rho``, else from the
field's global Zipf distribution; a token's weight is its home cluster's effect plus noise; dense
counts depend on the cluster; the label is Bernoulli(sigmoid(bias + cluster effect + token weights +
dense effect)), with the bias calibrated for a ~25% click rate. Tokens that co-occur (same cluster)
thus carry related signal, which is what LMA's similarity-driven sharing is meant to exploit.

Everything is vectorised per chunk and written as bytes assembled in NumPy (no per-value Python).
Rows are drawn in blocks of BLOCK_ROWS, block b from its own random stream, so the same (seed, scale,
params) give byte-identical files (gzip included) whatever ``chunk_rows``, and a file of fewer rows
is a prefix of one with more.
"""

from __future__ import annotations

import gzip
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Distinct values of C1..C26 in Criteo Kaggle's train.txt (45.8M rows).
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
NUM_DENSE = 13
BLOCK_ROWS = 8192  # rows per random stream: the output never depends on how many are generated at once
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_HEX_PAIRS = np.stack([_HEX[np.arange(256) >> 4], _HEX[np.arange(256) & 15]], axis=1)  # byte -> 2 hex digits
_TAB, _NEWLINE, _MINUS, _ZERO = 9, 10, 45, 48


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the latent model (docs/DATA.md, "Synthetic data"); the defaults are the documented ones."""

    clusters: int = 100  # C
    cluster_zipf: float = 1.0  # s_c: P(c) ∝ (c + 1)^-s_c
    token_zipf: float = 1.1  # s_t: Zipf exponent of every token distribution (global and per cluster)
    rho: float = 0.5  # probability that a field's token comes from the row cluster's own list
    missing: float = 0.04  # probability that any categorical or dense value is missing
    negative: float = 0.02  # probability that I2 is negative (-1, -2 or -3), as in Criteo
    cluster_effect: float = 0.5  # beta: weight of the cluster effect u_c in the logit
    token_effect: float = 0.5  # gamma: the token weights enter as gamma / sqrt(F) * sum_f w
    token_noise: float = 1.0  # sigma: w_t = u_home(t) + sigma * e_t
    dense_log_means: tuple[float, ...] = (0.5, 1.0, 2.0, 1.5, 8.0, 3.5, 1.0, 2.0, 3.5, -0.5, 0.5, -1.0, 1.5)
    dense_cluster_spread: float = 0.5  # std of the cluster offsets v_ck of the log-means
    dense_noise: float = 0.5  # std of the per-value log-normal noise of the Poisson means
    dense_effect: float = 0.1  # std of the dense coefficients g_k
    ctr: float = 0.25  # target click rate; the bias is calibrated to it
    calibration_rows: int = 65536

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")
        for name in ("rho", "missing", "negative"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 < self.ctr < 1.0:
            raise ValueError(f"ctr must be in (0, 1), got {self.ctr}")
        if len(self.dense_log_means) != NUM_DENSE:
            raise ValueError(f"dense_log_means must have {NUM_DENSE} values, got {len(self.dense_log_means)}")


def scaled_cardinalities(scale: float) -> list[int]:
    """Criteo Kaggle's per-field cardinalities times ``scale``, at least 2 each."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    return [max(2, round(c * scale)) for c in CRITEO_CARDINALITIES]


class _Field:
    """One categorical field: token weights, home clusters and per-cluster token lists."""

    def __init__(self, cardinality: int, clusters: int, u: np.ndarray, p: SynthParams, rng: np.random.Generator):
        self.n = cardinality
        # Tokens 0..n-1 are ranked by global popularity; each gets a home cluster.
        home = rng.integers(0, clusters, cardinality)
        self.weight = (u[home] + p.token_noise * rng.standard_normal(cardinality)).astype(np.float32)
        # Cluster c's list: its home tokens in global-rank order, i.e. members[start[c] : start[c] + size[c]].
        self.members = np.argsort(home, kind="stable").astype(np.int32)
        self.size = np.bincount(home, minlength=clusters)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        # Token t is written as the 8 hex digits of (a * t + b) mod 2^32 (a odd: distinct per token).
        self.a = int(rng.integers(0, 2**31)) * 2 + 1
        self.b = int(rng.integers(0, 2**32))


class _Model:
    """All latent parameters, drawn once from the seed."""

    def __init__(self, cardinalities: list[int], p: SynthParams, rng: np.random.Generator):
        self.p = p
        c = np.arange(1, p.clusters + 1, dtype=np.float64)
        self.cluster_cdf = np.cumsum(c**-p.cluster_zipf)
        self.cluster_cdf /= self.cluster_cdf[-1]
        self.u = rng.standard_normal(p.clusters)  # cluster effects u_c
        # harmonic[k] = sum_{i=1..k} i^-s_t: a Zipf over the first L ranks has cdf harmonic[j + 1] / harmonic[L].
        ranks = np.arange(1, max(cardinalities) + 1, dtype=np.float64)
        self.harmonic = np.concatenate([[0.0], np.cumsum(ranks**-p.token_zipf)])
        self.fields = [_Field(n, p.clusters, self.u, p, rng) for n in cardinalities]
        self.dense_offsets = p.dense_cluster_spread * rng.standard_normal((p.clusters, NUM_DENSE))  # v_ck
        self.dense_coef = p.dense_effect * rng.standard_normal(NUM_DENSE)  # g_k
        self.bias = 0.0

    def _zipf(self, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One Zipf(s_t) rank in [0, L) per row, for per-row list lengths L."""
        target = rng.random(len(lengths)) * self.harmonic[lengths]
        j = np.searchsorted(self.harmonic, target, side="right") - 1
        return np.clip(j, 0, lengths - 1)

    def draw(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """n rows: cluster, tokens (n, F) (-1 = missing), dense (n, 13) int64, dense_missing, logit without bias."""
        p = self.p
        cluster = np.minimum(np.searchsorted(self.cluster_cdf, rng.random(n), side="right"), p.clusters - 1)
        tokens = np.empty((n, len(self.fields)), np.int64)
        token_sum = np.zeros(n)
        for f, fld in enumerate(self.fields):
            from_cluster = (rng.random(n) < p.rho) & (fld.size[cluster] > 0)
            rank = self._zipf(np.where(from_cluster, fld.size[cluster], fld.n), rng)
            member = fld.members[np.minimum(fld.start[cluster] + rank, fld.n - 1)]
            tok = np.where(from_cluster, member, rank)
            missing = rng.random(n) < p.missing
            token_sum += np.where(missing, 0.0, fld.weight[tok])
            tokens[:, f] = np.where(missing, -1, tok)
        log_mean = np.asarray(p.dense_log_means) + self.dense_offsets[cluster]  # (n, 13)
        dense = rng.poisson(np.exp(log_mean + p.dense_noise * rng.standard_normal((n, NUM_DENSE))))
        negative = rng.random(n) < p.negative
        dense[:, 1] = np.where(negative, -rng.integers(1, 4, n), dense[:, 1])  # I2 may be -1, -2, -3
        dense_missing = rng.random((n, NUM_DENSE)) < p.missing
        z = np.where(dense_missing, 0.0, np.log1p(np.maximum(dense, 0)))  # what the model sees
        logit = (
            p.cluster_effect * self.u[cluster]
            + p.token_effect / math.sqrt(len(self.fields)) * token_sum
            + z @ self.dense_coef
        )
        return {"cluster": cluster, "tokens": tokens, "dense": dense, "dense_missing": dense_missing, "logit": logit}

    def calibrate(self, rng: np.random.Generator) -> None:
        """Set the bias so that the mean click probability over a calibration sample is the target CTR."""
        logit = self.draw(self.p.calibration_rows, rng)["logit"]
        lo, hi = -30.0, 30.0
        for _ in range(100):  # bisection: the mean probability increases with the bias
            mid = (lo + hi) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(mid + logit)))) < self.p.ctr:
                lo = mid
            else:
                hi = mid
        self.bias = (lo + hi) / 2


def _decimal_cells(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """int64 (n, k) -> uint8 (n, k, W): right-aligned ASCII decimals, 0 bytes as padding (and for missing)."""
    mag = np.abs(values)
    width = len(str(int(mag.max(initial=0)))) + 1  # + 1 for a sign
    rest = mag.astype(np.int32 if width <= 10 else np.int64)
    cells = np.zeros((*values.shape, width), np.uint8)
    sign_at = np.full(values.shape, width - 2)  # position of a "-": just left of the leading digit
    for position in range(width - 1, 0, -1):  # right to left; position 0 is only ever a sign
        nonzero = rest > 0
        digit = (rest % 10).astype(np.uint8) + _ZERO
        # Write a digit while the number has digits left; the last position always (0 prints as "0").
        cells[..., position] = np.where(nonzero | (position == width - 1), digit, 0)
        sign_at -= (nonzero & (rest >= 10)).astype(sign_at.dtype)
        rest //= 10
    negative = values < 0
    rows, cols = np.nonzero(negative)
    cells[rows, cols, sign_at[negative]] = _MINUS
    cells[missing] = 0
    return cells


def _hex_cells(fields: list[_Field], tokens: np.ndarray) -> np.ndarray:
    """Token ids (n, F) (-1 = missing) -> uint8 (n, F, 8): lowercase hex digits, 0 bytes for missing."""
    a = np.array([f.a for f in fields], np.uint64)
    b = np.array([f.b for f in fields], np.uint64)
    code = (tokens.astype(np.uint64) * a + b) & np.uint64(0xFFFFFFFF)  # (n, F); tokens < 2^24, a < 2^32: no wrap
    octets = code.astype(">u4").view(np.uint8).reshape(*tokens.shape, 4)  # most significant byte first
    cells = _HEX_PAIRS[octets].reshape(*tokens.shape, 8)  # (n, F, 4, 2) -> (n, F, 8)
    cells[tokens < 0] = 0
    return cells


def _format_rows(labels: np.ndarray, rows: dict[str, np.ndarray], fields: list[_Field]) -> bytes:
    """Criteo TSV bytes of n rows, assembled as a fixed-width byte matrix whose 0-byte padding is then dropped."""
    n, num_fields = rows["tokens"].shape
    dense = _decimal_cells(rows["dense"], rows["dense_missing"])  # (n, 13, W)
    width = dense.shape[2]
    # Row layout: label, then "\t" + cell for 13 dense cells of W bytes and F hex cells of 8 bytes, then "\n".
    dense_end = 1 + NUM_DENSE * (1 + width)
    matrix = np.empty((n, dense_end + num_fields * 9 + 1), np.uint8)
    matrix[:, 0] = labels + _ZERO
    dense_part = matrix[:, 1:dense_end].reshape(n, NUM_DENSE, 1 + width)
    dense_part[:, :, 0] = _TAB
    dense_part[:, :, 1:] = dense
    cat_part = matrix[:, dense_end:-1].reshape(n, num_fields, 9)
    cat_part[:, :, 0] = _TAB
    cat_part[:, :, 1:] = _hex_cells(fields, rows["tokens"])
    matrix[:, -1] = _NEWLINE
    flat = matrix.ravel()
    return flat[flat != 0].tobytes()


def _draw_blocks(model: _Model, seed: int, blocks: range) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and latent draws of consecutive blocks; block b always comes from default_rng([seed, 2, b])."""
    labels, draws = [], []
    for b in blocks:
        rng = np.random.default_rng([seed, 2, b])
        draw = model.draw(BLOCK_ROWS, rng)
        prob = 1.0 / (1.0 + np.exp(-(model.bias + draw["logit"])))
        labels.append((rng.random(BLOCK_ROWS) < prob).astype(np.int64))
        draws.append(draw)
    return np.concatenate(labels), {k: np.concatenate([d[k] for d in draws]) for k in draws[0]}


def _open_output(path: Path, compress: bool) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, writer): gzip with no name and mtime 0 in its header, so equal data gives equal bytes."""
    raw = open(path, "wb")  # noqa: SIM115 (closed by the caller, after the gzip writer)
    if compress:
        return raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)  # type: ignore[return-value]
    return raw, raw


def synthesize(
    out: str | os.PathLike[str],
    rows: int,
    seed: int = 0,
    scale: float = 0.001,
    chunk_rows: int = 100_000,
    params: SynthParams | None = None,
) -> dict[str, object]:
    """Write ``rows`` synthetic rows in Criteo TSV format to ``out`` (gzip when it ends in .gz).

    Args:
        out: output file; written to a temporary file beside it and renamed when complete.
        rows: number of rows (>= 1).
        seed: seed of the latent model and of every draw.
        scale: factor on Criteo Kaggle's per-field cardinalities (each at least 2).
        chunk_rows: rows generated and written at once (rounded down to whole blocks of BLOCK_ROWS);
            it bounds memory and does not change the output.
        params: the latent model; the documented defaults when None.

    Returns:
        A JSON-serialisable summary: rows, path, seed, scale, positive_rate, cardinalities, bias, seconds, ...
    """
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    p = params or SynthParams()
    cardinalities = scaled_cardinalities(scale)
    path = Path(out)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if path.is_dir():  # it once wrote the whole file, then failed to rename it there (IsADirectoryError)
        raise ValueError(f"--out {path}: is a directory; name the file to write (e.g. {path / 'synth.tsv'})")

    t0 = time.perf_counter()
    model = _Model(cardinalities, p, np.random.default_rng([seed, 0]))
    model.calibrate(np.random.default_rng([seed, 1]))
    positives = 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        raw, writer = _open_output(tmp, compress=path.name.endswith(".gz"))
        with raw, writer:
            blocks = -(-rows // BLOCK_ROWS)
            per_chunk = max(1, chunk_rows // BLOCK_ROWS)
            for first in range(0, blocks, per_chunk):
                labels, draw = _draw_blocks(model, seed, range(first, min(first + per_chunk, blocks)))
                n = min(len(labels), rows - first * BLOCK_ROWS)  # the last block is drawn whole, then cut
                labels, draw = labels[:n], {k: v[:n] for k, v in draw.items()}
                positives += int(labels.sum())
                writer.write(_format_rows(labels, draw, model.fields))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(path),
        "rows": rows,
        "seed": seed,
        "scale": scale,
        "positive_rate": positives / rows,
        "cardinalities": cardinalities,
        "bias": model.bias,
        "bytes": path.stat().st_size,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
