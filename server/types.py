"""The shapes the model side sees: :class:`Rows` of a request, a :class:`Batch` of graph inputs, its :class:`Scores`.

A request hands the batcher :class:`Rows`: either a :class:`Batch` (graph inputs already, e.g. v2 INT64
keys) or raw values still to featurize (:class:`server.featurize.RawRows`). The batcher cuts rows with
``slice``, glues the pieces of one runtime call with :func:`to_batch` (raw values of many requests are
featurized together, in one pass) and cuts the :class:`Scores` back along the same row ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import numpy as np

R = TypeVar("R", bound="Rows")


class Rows(Protocol):
    """Samples of one request (or a piece of one), in any form the batcher can cut and glue."""

    def __len__(self) -> int: ...

    def slice(self: R, start: int, stop: int) -> R: ...

    @staticmethod
    def merge(pieces: Sequence[Rows]) -> Batch:
        """Graph inputs of ``pieces`` (all of this type), in order."""
        ...


def to_batch(pieces: Sequence[Rows]) -> Batch:
    """The graph inputs of ``pieces`` in order: each kind merged by its own type, in one go where they agree."""
    first = type(pieces[0])
    if all(type(p) is first for p in pieces):
        return first.merge(pieces)
    return Batch.concatenate([type(p).merge([p]) for p in pieces])


class _Columns:
    """Two arrays of one length B (the dataclass's fields, named in ``_columns``): len, slice, concatenate."""

    __slots__ = ()
    _columns: ClassVar[tuple[str, str]]

    def __len__(self) -> int:
        return int(getattr(self, self._columns[1]).shape[0])

    def slice(self: C, start: int, stop: int) -> C:
        a, b = self._columns
        return type(self)(getattr(self, a)[start:stop], getattr(self, b)[start:stop])  # type: ignore[call-arg]

    @classmethod
    def concatenate(cls: type[C], parts: Sequence[C]) -> C:
        if len(parts) == 1:
            return parts[0]
        a, b = cls._columns
        return cls(  # type: ignore[call-arg]
            np.concatenate([getattr(p, a) for p in parts]), np.concatenate([getattr(p, b) for p in parts])
        )


C = TypeVar("C", bound=_Columns)


@dataclass(frozen=True, slots=True)
class Batch(_Columns):
    """Graph inputs of B samples.

    Args:
        dense: float32 (B, n_dense), already transformed by :func:`models.schema.transform_dense`.
        keys: int64 (B, n_fields), token keys from the bundle's :class:`~models.schema.FeatureSchema`.
    """

    dense: np.ndarray
    keys: np.ndarray
    _columns: ClassVar[tuple[str, str]] = ("dense", "keys")

    def __post_init__(self) -> None:
        if self.dense.dtype != np.float32 or self.keys.dtype != np.int64:
            raise TypeError(f"Batch needs float32 dense and int64 keys, got {self.dense.dtype} and {self.keys.dtype}")
        if self.dense.ndim != 2 or self.keys.ndim != 2 or self.dense.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"Batch needs (B, n_dense) and (B, F) arrays, got {self.dense.shape} and {self.keys.shape}"
            )

    @staticmethod
    def merge(pieces: Sequence[Rows]) -> Batch:
        return Batch.concatenate(pieces)  # type: ignore[arg-type]

    @staticmethod
    def zeros(size: int, num_dense: int, num_fields: int) -> Batch:
        """A batch of all-missing samples (used to warm runtimes up)."""
        return Batch(np.zeros((size, num_dense), np.float32), np.zeros((size, num_fields), np.int64))


@dataclass(frozen=True, slots=True)
class Scores(_Columns):
    """Graph outputs of B samples: click ``probability`` float32 (B,) and ``fallback_tokens`` int64 (B,)."""

    probability: np.ndarray
    fallback_tokens: np.ndarray
    _columns: ClassVar[tuple[str, str]] = ("probability", "fallback_tokens")


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded Open Inference Protocol input: numeric data as a flat array; BYTES as a flat list of str (JSON),
    or as :class:`BytesElements` (the binary extension)."""

    name: str
    datatype: str  # "FP32", "INT64", "BYTES", ...
    shape: tuple[int, ...]
    data: np.ndarray | list[str] | BytesElements


@dataclass(frozen=True, slots=True)
class BytesElements:
    """The BYTES elements of a binary input, where they lie in the body: no Python object per element.

    Element i is ``data[starts[i] : starts[i] + lengths[i]]``. ``packed`` hands short values to the
    schema's bulk key cache (:class:`models.schema.PackedKeys`); :meth:`strings` is the general path.
    """

    data: memoryview
    starts: np.ndarray  # int64 (n,)
    lengths: np.ndarray  # int64 (n,)
    packed: np.ndarray | None  # uint64 (n,) as models.schema.PackedKeys packs them, None when one does not pack

    def __len__(self) -> int:
        return len(self.starts)

    def strings(self) -> list[str]:
        raw = bytes(self.data)
        return [
            raw[s : s + n].decode("utf-8", "surrogateescape")
            for s, n in zip(self.starts.tolist(), self.lengths.tolist(), strict=True)
        ]
