"""File formats, the reasons a line is skipped, and the counts a read keeps.

- ``criteo``: Criteo Kaggle / Terabyte TSV, 40 columns: label, I1..I13, C1..C26, no header;
- ``criteo-csv``: the Kaggle CSV variant, header ``Id,Label,I1,...,I13,C1,...,C26`` (41 columns);
- ``avazu``: Avazu CSV, header of the 24 columns of :data:`models.schema.AVAZU_COLUMNS`; ``hour``
  (YYMMDDHH) becomes the fields ``hour_of_day`` and ``weekday``; ids stay strings (they overflow int64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.names import FORMATS
from models.schema import (
    AVAZU_CATEGORICAL,
    AVAZU_COLUMNS,
    CRITEO_CATEGORICAL,
    CRITEO_DENSE,
    FeatureSchema,
    avazu_schema,
    criteo_schema,
)

__all__ = ["FORMATS", "Format", "ReadStats", "schema_for_format"]

# Reasons a line is skipped (the keys of ReadStats.reasons), in the order they are checked.
DECODE = "decode"  # bytes that are not UTF-8 text (or hold a NUL)
BLANK_LINE = "blank_line"
LINE_TOO_LONG = "line_too_long"
FIELD_COUNT = "field_count"
LABEL = "label"  # not "0" or "1"
DENSE_VALUE = "dense_value"  # not a finite number
HOUR = "hour"  # Avazu `hour` not a valid YYMMDDHH


@dataclass
class ReadStats:
    """What a read kept and skipped. One instance can be passed to a reader to collect its counts."""

    rows: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped += n
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def add(self, other: ReadStats) -> None:
        self.rows += other.rows
        for reason, n in other.reasons.items():
            self.skip(reason, n)

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "skipped": self.skipped, "reasons": dict(sorted(self.reasons.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(int(d["rows"]), int(d["skipped"]), {str(k): int(v) for k, v in d["reasons"].items()})


@dataclass(frozen=True)
class Format:
    """Column layout of one file format."""

    name: str
    sep: str
    header: tuple[str, ...] | None
    num_columns: int
    label_column: int
    dense_columns: tuple[int, ...]
    categorical_columns: tuple[int, ...]  # copied as fields, after any derived ones
    id_column: int | None = None
    hour_column: int | None = None  # Avazu: derives hour_of_day and weekday, the first two fields
    dense_names: tuple[str, ...] = ()
    categorical_names: tuple[str, ...] = ()


_CRITEO_CSV_HEADER = ("Id", "Label", *CRITEO_DENSE, *CRITEO_CATEGORICAL)
_SPECS = {
    "criteo": Format(
        "criteo", "\t", None, 40, 0, tuple(range(1, 14)), tuple(range(14, 40)),
        dense_names=CRITEO_DENSE, categorical_names=CRITEO_CATEGORICAL,
    ),
    "criteo-csv": Format(
        "criteo-csv", ",", _CRITEO_CSV_HEADER, 41, 1, tuple(range(2, 15)), tuple(range(15, 41)), id_column=0,
        dense_names=CRITEO_DENSE, categorical_names=CRITEO_CATEGORICAL,
    ),
    "avazu": Format(
        "avazu", ",", AVAZU_COLUMNS, 24, 1, (), tuple(range(3, 24)), id_column=0, hour_column=2,
        categorical_names=AVAZU_CATEGORICAL,
    ),
}  # fmt: skip
assert tuple(_SPECS) == FORMATS


def spec(fmt: str) -> Format:
    """The layout of format ``fmt`` (ValueError naming the known ones)."""
    try:
        return _SPECS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def schema_for_format(fmt: str, hash_seed: int = 0) -> FeatureSchema:
    """The feature schema of a file format (Criteo: 13 dense + 26 fields; Avazu: 23 fields)."""
    return avazu_schema(hash_seed) if spec(fmt).name == "avazu" else criteo_schema(hash_seed)


def check_schema(fmt: Format, schema: FeatureSchema) -> None:
    if schema.dense_names != fmt.dense_names or schema.categorical_names != fmt.categorical_names:
        raise ValueError(
            f"schema does not match format {fmt.name!r}: expected dense {list(fmt.dense_names)} and "
            f"categorical {list(fmt.categorical_names)}, got {list(schema.dense_names)} and "
            f"{list(schema.categorical_names)} (use schema_for_format)"
        )
