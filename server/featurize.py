"""Request payloads -> graph inputs, validated against a bundle's feature schema.

Two payloads reach a model:

- native instances (``POST /v1/models/{name}:predict``)::

      {"dense": [1.0, null, ...] or {"I1": 1.0, ...},
       "categorical": ["68fd1e64", 1005, null, ...] or {"C1": "68fd1e64", ...},
       "entity": "user-42"}          # optional: stored features fill what the request leaves out

  A list must hold every feature in schema order; an object may name any subset. ``null`` or an
  absent name is a missing value (dense: 0 after the transform; categorical: the field's missing
  token). Dense values are raw numbers; categorical values are strings or integers (``1005`` and
  ``"1005"`` are the same token).
- Open Inference Protocol tensors (``POST /v2/models/{name}/infer``): ``dense`` FP32 [B, n_dense]
  raw values and ``categorical`` [B, n_fields] as BYTES (raw values) or INT64 (keys already hashed
  with the bundle's schema).

Every error is an :class:`~server.errors.InvalidInput` that names the instance (or tensor) and the
field. The raw values become numbers only through :mod:`models.schema` (:func:`transform_dense`,
:meth:`FeatureSchema.keys_for`, with its per-field caches of hot values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.schema import KEY_MASK, FeatureSchema, transform_dense
from server.errors import EntityNotFound, InvalidInput, PayloadTooLarge
from server.types import Batch, Tensor

NAN = math.nan
INSTANCE_KEYS = frozenset(("dense", "categorical", "entity", "missing_entity"))
MISSING_ENTITY_POLICIES = ("error", "defaults")
TENSOR_NAMES = ("dense", "categorical")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def json_type(v: object) -> str:
    return "null" if v is None else _JSON_TYPES.get(type(v), type(v).__name__)


def check_count(n: int, limit: int, what: str) -> None:
    if n < 1:
        raise InvalidInput(f"{what}: expected at least one instance")
    if n > limit:
        raise PayloadTooLarge(f"{what}: {n} instances, more than the limit of {limit} (LMA_MAX_INSTANCES_PER_REQUEST)")


class _Features:
    """How one kind of feature (dense or categorical) of a schema is checked."""

    def __init__(
        self, key: str, names: tuple[str, ...], accepted: frozenset[type], missing: object, expected: str, what: str
    ) -> None:
        self.key = key  # the instance key: "dense" or "categorical"
        self.names = names
        self.index = {n: j for j, n in enumerate(names)}
        self.accepted = accepted  # exact types (bool is not int here)
        self.accepted_or_null = accepted | {type(None)}
        self.missing = missing
        self.expected = expected
        self.what = what
        self.shown = f"({names[0]}..{names[-1]})" if len(names) > 2 else str(list(names))


@dataclass(slots=True)
class Instances:
    """Parsed native instances: raw values per row, missing as NaN / None, plus feature-store keys."""

    dense: list[list[float]]  # (B, n_dense) raw, NaN = missing
    categorical: list[list[object]]  # (B, n_fields) raw, None = missing
    entities: list[str | None] | None  # per instance, None when no instance names an entity
    defaults_ok: set[int] | None = None  # instances that said "missing_entity": "defaults"

    def __len__(self) -> int:
        return len(self.categorical)


class Featurizer:
    """Validates payloads against one :class:`~models.schema.FeatureSchema` and builds :class:`Batch` es."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.num_dense = schema.num_dense
        self.num_fields = schema.num_fields
        self._dense = _Features(
            "dense", schema.dense_names, frozenset((float, int)), NAN, "a number or null", "feature"
        )
        self._categorical = _Features(
            "categorical",
            schema.categorical_names,
            frozenset((str, int)),
            None,
            "a string, an integer or null",
            "field",
        )
        self.dense_index = self._dense.index
        self.categorical_index = self._categorical.index

    # --- native instances ---

    def parse_instances(self, instances: object, max_instances: int) -> Instances:
        if type(instances) is not list:
            raise InvalidInput(f"instances: expected an array of objects, got {json_type(instances)}")
        check_count(len(instances), max_instances, "instances")
        dense: list[list[float]] = []
        categorical: list[list[object]] = []
        entities: list[str | None] | None = None
        defaults_ok: set[int] | None = None
        for i, inst in enumerate(instances):
            if type(inst) is not dict:
                raise InvalidInput(f"instances[{i}]: expected an object, got {json_type(inst)}")
            if not inst.keys() <= INSTANCE_KEYS:
                unknown = sorted(set(inst) - INSTANCE_KEYS)
                raise InvalidInput(
                    f"instances[{i}]: unknown key {unknown[0]!r}; expected dense, categorical, entity, missing_entity"
                )
            dense.append(self._row(i, inst.get("dense"), self._dense))
            categorical.append(self._row(i, inst.get("categorical"), self._categorical))
            entity = inst.get("entity")
            if entity is not None:
                if type(entity) is not str or not entity:
                    raise InvalidInput(f"instances[{i}].entity: expected a non-empty string, got {json_type(entity)}")
                if entities is None:
                    entities = [None] * len(instances)
                entities[i] = entity
            policy = inst.get("missing_entity")
            if policy is not None:
                if policy not in MISSING_ENTITY_POLICIES:
                    expected = list(MISSING_ENTITY_POLICIES)
                    raise InvalidInput(f"instances[{i}].missing_entity: expected one of {expected}, got {policy!r}")
                if policy == "defaults":
                    defaults_ok = set() if defaults_ok is None else defaults_ok
                    defaults_ok.add(i)
        return Instances(dense, categorical, entities, defaults_ok)

    def _row(self, i: int, values: object, f: _Features) -> list[Any]:
        """One instance's raw values of one kind, in schema order (missing: ``f.missing``)."""
        n = len(f.names)
        if values is None:
            return [f.missing] * n
        if type(values) is list:
            if len(values) != n:
                raise InvalidInput(f"instances[{i}].{f.key}: expected {n} values {f.shown}, got {len(values)}")
            types = set(map(type, values))  # one C-level pass; the loop below only runs to name a bad value
            if types <= f.accepted:
                return values
            if not types <= f.accepted_or_null:
                for j, v in enumerate(values):
                    if type(v) not in f.accepted_or_null:
                        raise InvalidInput(
                            f"instances[{i}].{f.key}[{j}] ({f.names[j]}): expected {f.expected}, got {json_type(v)}"
                        )
            return values if f.missing is None else [f.missing if v is None else v for v in values]
        if type(values) is dict:
            row = [f.missing] * n
            for name, v in values.items():
                idx = f.index.get(name)
                if idx is None:
                    raise InvalidInput(f"instances[{i}].{f.key}: unknown {f.what} {name!r}; expected {f.shown}")
                if type(v) in f.accepted:
                    row[idx] = v
                elif v is not None:
                    raise InvalidInput(f"instances[{i}].{f.key}.{name}: expected {f.expected}, got {json_type(v)}")
            return row
        raise InvalidInput(f"instances[{i}].{f.key}: expected an array or an object, got {json_type(values)}")

    def merge_stored(self, parsed: Instances, stored: Sequence[Mapping[str, object] | None]) -> None:
        """Fill what each instance left missing from its entity's stored features (request values win).

        ``stored[i]`` belongs to instance i (None: no entity or nothing stored). Stored names the
        model does not know are ignored: one store can serve several models. An instance whose
        entity has nothing stored is an error (404 ``entity_not_found``) unless it said
        ``"missing_entity": "defaults"``: then it is scored with what it sent (missing = defaults).
        """
        for i, features in enumerate(stored):
            if not features:
                entity = parsed.entities[i] if parsed.entities else None
                if entity is not None and not (parsed.defaults_ok and i in parsed.defaults_ok):
                    raise EntityNotFound(
                        f"instances[{i}].entity: nothing stored for entity {entity!r}; send"
                        ' "missing_entity": "defaults" to score it with the values it carries'
                    )
                continue
            dense, categorical = parsed.dense[i], parsed.categorical[i]
            for name, v in features.items():
                j = self.dense_index.get(name)
                if j is not None:
                    if math.isnan(dense[j]) and v is not None and v != "":
                        dense[j] = self._stored_number(i, parsed, name, v)
                    continue
                j = self.categorical_index.get(name)
                if j is not None and categorical[j] is None:
                    categorical[j] = self._stored_token(i, parsed, name, v)

    @staticmethod
    def _stored_number(i: int, parsed: Instances, name: str, v: object) -> float:
        try:
            if type(v) is bool:
                raise TypeError
            return float(v.decode() if isinstance(v, bytes) else v)  # type: ignore[arg-type]
        except (TypeError, ValueError, UnicodeDecodeError):
            entity = parsed.entities[i] if parsed.entities else None
            raise InvalidInput(
                f"instances[{i}]: stored feature {name} of entity {entity!r} is not a number: {v!r}"
            ) from None

    @staticmethod
    def _stored_token(i: int, parsed: Instances, name: str, v: object) -> object:
        if isinstance(v, bytes):
            return v.decode("utf-8", "surrogateescape")
        if v is None or type(v) is str or type(v) is int:
            return v
        entity = parsed.entities[i] if parsed.entities else None
        raise InvalidInput(f"instances[{i}]: stored feature {name} of entity {entity!r} has type {json_type(v)}")

    def instances_batch(self, parsed: Instances) -> Batch:
        dense = np.array(parsed.dense, dtype=np.float64).reshape(len(parsed), self.num_dense)
        return Batch(transform_dense(dense), self.schema.keys_for(parsed.categorical))

    # --- Open Inference Protocol tensors ---

    def tensors_batch(self, tensors: Sequence[Tensor], max_instances: int) -> Batch:
        by_name: dict[str, Tensor] = {}
        for t in tensors:
            if t.name not in TENSOR_NAMES:
                raise InvalidInput(f"input {t.name!r}: unknown input; this model takes {list(TENSOR_NAMES)}")
            if t.name in by_name:
                raise InvalidInput(f"input {t.name!r}: given twice")
            by_name[t.name] = t
        if "categorical" not in by_name:
            raise InvalidInput(f"input 'categorical' is missing: expected [batch, {self.num_fields}] BYTES or INT64")
        cat = by_name["categorical"]
        rows = self._tensor_rows(cat, self.num_fields, max_instances)
        if cat.datatype == "INT64":
            keys = np.ascontiguousarray(cat.data, dtype=np.int64).reshape(rows, self.num_fields)
            bad = np.flatnonzero((keys < 0) | (keys > KEY_MASK))
            if bad.size:
                r, c = divmod(int(bad[0]), self.num_fields)
                raise InvalidInput(
                    f"input 'categorical'[{r}][{c}] ({self.schema.categorical_names[c]}): key {keys[r, c]} is"
                    " outside [0, 2**62); send raw values as BYTES, or keys hashed with this model's schema"
                )
        elif cat.datatype == "BYTES":
            values = list(cat.data)
            f = self.num_fields
            keys = self.schema.keys_for([values[r * f : (r + 1) * f] for r in range(rows)])
        else:
            raise InvalidInput(f"input 'categorical': datatype {cat.datatype} is not supported; use BYTES or INT64")
        dense_t = by_name.get("dense")
        if dense_t is None:
            if self.num_dense:
                raise InvalidInput(f"input 'dense' is missing: expected [batch, {self.num_dense}] FP32")
            dense = np.zeros((rows, 0), np.float32)
        else:
            if dense_t.datatype != "FP32":
                raise InvalidInput(f"input 'dense': datatype {dense_t.datatype} is not supported; use FP32")
            if self._tensor_rows(dense_t, self.num_dense, max_instances) != rows:
                raise InvalidInput(
                    f"input 'dense': shape {list(dense_t.shape)} and 'categorical' {list(cat.shape)}"
                    " differ in batch size"
                )
            raw = np.asarray(dense_t.data, dtype=np.float32).reshape(rows, self.num_dense)
            dense = transform_dense(raw)
        return Batch(dense, keys)

    def _tensor_rows(self, t: Tensor, width: int, max_instances: int) -> int:
        if len(t.shape) != 2 or t.shape[1] != width:
            raise InvalidInput(f"input {t.name!r}: shape {list(t.shape)} is not [batch, {width}]")
        check_count(t.shape[0], max_instances, f"input {t.name!r}")
        if len(t.data) != t.shape[0] * width:
            raise InvalidInput(f"input {t.name!r}: {len(t.data)} values do not fill shape {list(t.shape)}")
        return t.shape[0]
