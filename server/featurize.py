"""Request payloads -> graph inputs, validated against a bundle's feature schema.

Two payloads reach a model:

- native instances (``POST /v1/models/{name}:predict``, :mod:`server.protocols.native`)::

      {"dense": [1.0, null, ...] or {"I1": 1.0, ...},
       "categorical": ["68fd1e64", 1005, null, ...] or {"C1": "68fd1e64", ...},
       "entity": "user-42",            # optional: stored features fill what the request leaves out
       "missing_entity": "defaults"}   # optional: score an entity with nothing stored anyway

  A list must hold every feature in schema order; an object may name any subset. ``null`` or an
  absent name is a missing value (dense: 0 after the transform; categorical: the field's missing
  token). Dense values are raw numbers; categorical values are strings or integers (``1005`` and
  ``"1005"`` are the same token).
- Open Inference Protocol tensors (``POST /v2/models/{name}/infer``, :mod:`server.protocols.v2`):
  ``dense`` FP32 [B, n_dense] raw values and ``categorical`` [B, n_fields] as BYTES (raw values) or
  INT64 (keys already hashed with the bundle's schema). BYTES sent with the binary extension (what
  ``tritonclient`` does by default) become :class:`PackedRows` when every value packs into 8 bytes:
  keyed in bulk by the batcher (:class:`~models.schema.PackedKeys`: array work, no Python object per value).

A native body whose instances are all in the canonical form (exactly ``dense`` and ``categorical``, each a
full list; a key whose schema width is 0 may be left out) of common values (numbers; tokens of at most 8
ASCII bytes) is read by one compiled pass over its bytes (:func:`server.protocols.native.codec.scan_instances`)
into :class:`PackedRows`, as binary v2 tensors are: no Python object per value. Any other body is parsed by
orjson and checked as below.

Validation runs per request, so that every error is an :class:`~server.errors.InvalidInput` naming
the instance (or tensor) and the field. Instances in the canonical form (exactly ``dense`` and
``categorical``, each a full list) are checked for the whole request at once, with C-level passes
over all of its instances and then all of its values (``set(map(type, values))``); any other request,
and any that fails that check, is checked instance by instance, and a row is only walked value by
value to name a bad one. What it yields is :class:`RawRows`:
the raw values, flat and row-major. Turning them into numbers waits for the batcher, which glues the
raw rows of every request of a runtime call and featurizes them in one pass (:meth:`RawRows.merge`:
one ``np.array`` + :func:`~models.schema.transform_dense` for the dense values, one
:meth:`~models.schema.FeatureSchema.keys_flat` over the cached keys of hot tokens). Raw values become
numbers only through :mod:`models.schema`.
"""

from __future__ import annotations

import itertools
import math
import operator
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson

from models.schema import KEY_MASK, FeatureSchema, PackedKeys, transform_dense
from server.errors import EntityNotFound, InvalidInput, PayloadTooLarge
from server.protocols.native import codec
from server.protocols.native.schemas import INSTANCE_FIELDS, INSTANCE_KEYS, MISSING_ENTITY_POLICIES, PREDICT_KEYS
from server.types import Batch, BytesElements, Rows, Tensor

TENSOR_NAMES = ("dense", "categorical")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
_NUMBER = frozenset((float, int))
_TOKEN = frozenset((str, int))
_DICTS, _LISTS = {dict}, {list}
_chain = itertools.chain.from_iterable
_dense_of, _categorical_of = operator.itemgetter("dense"), operator.itemgetter("categorical")
# Hot values of binary BYTES tensors: 2**15 slots per field (26 fields: 13.6 MB) in each thread that keys them
# (the batcher's runtime thread, and the event loop for short batches), made by the first such request
PACKED_SLOT_BITS = 15


def json_type(v: object) -> str:
    return "null" if v is None else _JSON_TYPES.get(type(v), type(v).__name__)


def parse_json_object(body: bytes, allowed: frozenset[str], required: str | None = None) -> dict[str, Any]:
    """``body`` as a JSON object with only ``allowed`` keys (empty: ``{}`` unless a key is ``required``)."""
    if required is None and not body.strip():
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body: not valid JSON ({e})") from None
    if type(obj) is not dict:
        raise InvalidInput(f"body: expected an object, got {json_type(obj)}")
    if not obj.keys() <= allowed:
        raise InvalidInput(f"body: unknown key {sorted(set(obj) - allowed)[0]!r}; expected {sorted(allowed)}")
    if required is not None and required not in obj:
        raise InvalidInput(f"body: {required!r} is missing")
    return obj


def check_count(n: int, limit: int, what: str) -> None:
    if n < 1:
        raise InvalidInput(f"{what}: expected at least one instance")
    if n > limit:
        raise PayloadTooLarge(f"{what}: {n} instances, more than the limit of {limit} (LMA_MAX_INSTANCES_PER_REQUEST)")


@dataclass(slots=True)
class RawRows:
    """``size`` samples as raw values, flat and row-major, featurized when the batcher runs them.

    Args:
        featurizer: the model's featurizer (its schema turns the values into graph inputs).
        size: B.
        dense: B x n_dense raw numbers, None or NaN = missing (``np.array`` makes None NaN).
        categorical: B x F raw tokens (str or int), None = missing.
    """

    featurizer: Featurizer
    size: int
    dense: list[float | None]
    categorical: list[object]

    def __len__(self) -> int:
        return self.size

    def slice(self, start: int, stop: int) -> RawRows:
        nd, nf = self.featurizer.num_dense, self.featurizer.num_fields
        return RawRows(
            self.featurizer, stop - start, self.dense[start * nd : stop * nd], self.categorical[start * nf : stop * nf]
        )

    @staticmethod
    def merge(pieces: Sequence[Rows]) -> Batch:
        parts: Sequence[RawRows] = pieces  # type: ignore[assignment]
        if len(parts) == 1:
            p = parts[0]
            return p.featurizer.batch(p.dense, p.categorical, p.size)
        featurizer = parts[0].featurizer
        if any(p.featurizer is not featurizer for p in parts):
            return Batch.concatenate([p.featurizer.batch(p.dense, p.categorical, p.size) for p in parts])
        dense = list(_chain(p.dense for p in parts))
        categorical = list(_chain(p.categorical for p in parts))
        return featurizer.batch(dense, categorical, sum(p.size for p in parts))


@dataclass(slots=True)
class PackedRows:
    """``size`` samples whose tokens all pack into 8 bytes (a binary v2 request, or a native body the codec's scan
    read), keyed when the batcher runs them.

    Args:
        featurizer: the model's featurizer.
        size: B.
        dense: (B, n_dense) raw values, float32 from a v2 tensor (missing: NaN or 0, as sent) or float64 from a
            native body (missing: NaN); :func:`~models.schema.transform_dense` makes both float64 first.
        packed: uint64 (B, F) tokens packed as :class:`~models.schema.PackedKeys` packs values.
    """

    featurizer: Featurizer
    size: int
    dense: np.ndarray
    packed: np.ndarray

    def __len__(self) -> int:
        return self.size

    def slice(self, start: int, stop: int) -> PackedRows:
        return PackedRows(self.featurizer, stop - start, self.dense[start:stop], self.packed[start:stop])

    @staticmethod
    def merge(pieces: Sequence[Rows]) -> Batch:
        parts: Sequence[PackedRows] = pieces  # type: ignore[assignment]
        featurizer = parts[0].featurizer
        if len(parts) == 1 or any(p.featurizer is not featurizer for p in parts):
            return Batch.concatenate([p.featurizer.packed_batch(p.dense, p.packed) for p in parts])
        return featurizer.packed_batch(
            np.concatenate([p.dense for p in parts]), np.concatenate([p.packed for p in parts])
        )


@dataclass(slots=True)
class Instances:
    """Parsed native instances: their raw rows, plus what the feature store needs."""

    rows: RawRows | PackedRows  # PackedRows: a body the native codec's scan read (no entity)
    entities: list[str | None] | None  # per instance, None when no instance names an entity
    defaults_ok: set[int] | None = None  # instances that said "missing_entity": "defaults"

    def __len__(self) -> int:
        return self.rows.size


class Featurizer:
    """Validates payloads against one :class:`~models.schema.FeatureSchema` and makes their rows."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.num_dense = schema.num_dense
        self.num_fields = schema.num_fields
        self.dense_names = schema.dense_names
        self.categorical_names = schema.categorical_names
        self.dense_index = {n: j for j, n in enumerate(schema.dense_names)}
        self.categorical_index = {n: j for j, n in enumerate(schema.categorical_names)}
        self._packed = threading.local()
        self._dense_kind = _Kind("dense", "feature", schema.dense_names, _NUMBER, "a number or null")
        self._categorical_kind = _Kind(
            "categorical", "field", schema.categorical_names, _TOKEN, "a string, an integer or null"
        )

    def _packed_keys(self) -> PackedKeys:
        """This thread's bulk key cache (made on first use: PACKED_SLOT_BITS slots per field, 16 bytes each)."""
        cache: PackedKeys | None = getattr(self._packed, "keys", None)
        if cache is None:
            cache = self._packed.keys = PackedKeys(self.schema, PACKED_SLOT_BITS)
        return cache

    def packed_batch(self, dense: np.ndarray, packed: np.ndarray) -> Batch:
        """Graph inputs of raw dense values (B, n_dense) and packed tokens (B, F) (:class:`PackedRows`)."""
        return Batch(transform_dense(dense), self._packed_keys().rows(packed))

    def batch(self, dense: list[float | None], categorical: list[object], size: int) -> Batch:
        """Graph inputs of ``size`` rows of validated raw values (flat, row-major)."""
        raw = np.array(dense, dtype=np.float64).reshape(size, self.num_dense)
        return Batch(transform_dense(raw), self.schema.keys_flat(categorical, size))

    # --- native instances ---

    def parse_body(self, body: bytes, max_instances: int) -> Instances:
        """A native predict body's instances: one compiled scan of the bytes when they are in the canonical form
        (:func:`server.protocols.native.codec.scan_instances`), else orjson and :meth:`parse_instances`."""
        scanned = codec.scan_instances(body, self.num_dense, self.num_fields, max_instances)
        if scanned is not None:
            dense, packed = scanned
            return Instances(PackedRows(self, len(packed), dense, packed), None)
        return self.parse_instances(parse_json_object(body, PREDICT_KEYS, "instances")["instances"], max_instances)

    def parse_instances(self, instances: object, max_instances: int) -> Instances:
        if type(instances) is not list:
            raise InvalidInput(f"instances: expected an array of objects, got {json_type(instances)}")
        check_count(len(instances), max_instances, "instances")
        rows = self._canonical(instances)
        if rows is not None:
            return Instances(rows, None)
        dense: list[float | None] = []
        categorical: list[object] = []
        entities: list[str | None] | None = None
        defaults_ok: set[int] | None = None
        for i, inst in enumerate(instances):
            if type(inst) is not dict:
                raise InvalidInput(f"instances[{i}]: expected an object, got {json_type(inst)}")
            if not inst.keys() <= INSTANCE_KEYS:
                unknown = sorted(set(inst) - INSTANCE_KEYS)
                raise InvalidInput(f"instances[{i}]: unknown key {unknown[0]!r}; expected {', '.join(INSTANCE_FIELDS)}")
            self._dense(i, inst.get("dense"), dense)
            self._categorical(i, inst.get("categorical"), categorical)
            if len(inst) > ("dense" in inst) + ("categorical" in inst):  # entity or missing_entity
                entity = inst.get("entity")
                if entity is not None:
                    if type(entity) is not str or not entity:
                        raise InvalidInput(
                            f"instances[{i}].entity: expected a non-empty string, got {json_type(entity)}"
                        )
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
        return Instances(RawRows(self, len(instances), dense, categorical), entities, defaults_ok)

    def _canonical(self, instances: list[Any]) -> RawRows | None:
        """The rows of ``instances`` when every one is ``{"dense": [...], "categorical": [...]}`` with full, valid
        lists: one C-level pass over the instances per check, then one over all their values of each kind.

        None when any instance is in another form or holds a bad value: the instance-by-instance check
        then accepts it or names what is wrong, so the messages do not depend on this shortcut.
        """
        if set(map(type, instances)) != _DICTS or set(map(len, instances)) != {2}:
            return None
        try:
            dense_rows, categorical_rows = list(map(_dense_of, instances)), list(map(_categorical_of, instances))
        except KeyError:
            return None
        if set(map(type, dense_rows)) != _LISTS or set(map(type, categorical_rows)) != _LISTS:
            return None
        if set(map(len, dense_rows)) != {self.num_dense} or set(map(len, categorical_rows)) != {self.num_fields}:
            return None
        dense, categorical = list(_chain(dense_rows)), list(_chain(categorical_rows))
        if not set(map(type, dense)) <= self._dense_kind.accepted_or_null:
            return None
        if not set(map(type, categorical)) <= self._categorical_kind.accepted_or_null:
            return None
        return RawRows(self, len(instances), dense, categorical)

    def _dense(self, i: int, values: object, out: list[float | None]) -> None:
        """Append one instance's raw dense values in schema order (missing: None) to ``out``."""
        self._values(i, values, out, self._dense_kind)

    def _categorical(self, i: int, values: object, out: list[object]) -> None:
        """Append one instance's raw tokens in schema order (missing: None) to ``out``."""
        self._values(i, values, out, self._categorical_kind)

    def _values(self, i: int, values: object, out: list[Any], k: _Kind) -> None:
        """Append one instance's values of one kind (dense or categorical) to ``out``, in schema order."""
        if values is None:
            out += k.missing_row
        elif type(values) is list:
            if len(values) != k.size:
                raise InvalidInput(f"instances[{i}].{k.key}: expected {k.size} values {k.shown}, got {len(values)}")
            if not set(map(type, values)) <= k.accepted_or_null:  # one C-level pass; the loop only names a bad value
                self._bad_value(i, k.key, values, k.accepted_or_null, k.names, k.expected)
            out += values
        elif type(values) is dict:
            row = list(k.missing_row)
            index = k.index
            for name, v in values.items():
                j = index.get(name)
                if j is None:
                    raise InvalidInput(f"instances[{i}].{k.key}: unknown {k.what} {name!r}; expected {k.shown}")
                if type(v) in k.accepted:
                    row[j] = v
                elif v is not None:
                    raise InvalidInput(f"instances[{i}].{k.key}.{name}: expected {k.expected}, got {json_type(v)}")
            out += row
        else:
            raise InvalidInput(f"instances[{i}].{k.key}: expected an array or an object, got {json_type(values)}")

    @staticmethod
    def _bad_value(
        i: int, key: str, values: list[Any], accepted: frozenset[type], names: tuple[str, ...], expected: str
    ) -> None:
        for j, v in enumerate(values):
            if type(v) not in accepted:
                raise InvalidInput(f"instances[{i}].{key}[{j}] ({names[j]}): expected {expected}, got {json_type(v)}")

    def merge_stored(self, parsed: Instances, stored: Sequence[Mapping[str, object] | None]) -> None:
        """Fill what each instance left missing from its entity's stored features (request values win).

        ``stored[i]`` belongs to instance i (None: no entity or nothing stored). Stored names the
        model does not know are ignored: one store can serve several models. An instance whose
        entity has nothing stored is an error (404 ``entity_not_found``) unless it said
        ``"missing_entity": "defaults"``: then it is scored with what it sent (missing = defaults).
        """
        rows = parsed.rows
        assert isinstance(rows, RawRows)  # only parse_instances reads entities
        nd, nf = self.num_dense, self.num_fields
        for i, features in enumerate(stored):
            if not features:
                entity = parsed.entities[i] if parsed.entities else None
                if entity is not None and not (parsed.defaults_ok and i in parsed.defaults_ok):
                    raise EntityNotFound(
                        f"instances[{i}].entity: nothing stored for entity {entity!r}; send"
                        ' "missing_entity": "defaults" to score it with the values it carries'
                    )
                continue
            for name, v in features.items():
                j = self.dense_index.get(name)
                if j is not None:
                    k = i * nd + j
                    sent = rows.dense[k]
                    if (sent is None or math.isnan(sent)) and v is not None and v != "":
                        rows.dense[k] = self._stored_number(i, parsed, name, v)
                    continue
                j = self.categorical_index.get(name)
                if j is not None and rows.categorical[i * nf + j] is None:
                    rows.categorical[i * nf + j] = self._stored_token(i, parsed, name, v)

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

    # --- Open Inference Protocol tensors ---

    def tensors_rows(self, tensors: Sequence[Tensor], max_instances: int) -> Rows:
        """The rows of v2 input tensors: a :class:`Batch` for INT64 keys, :class:`RawRows` for BYTES values."""
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
        if cat.datatype not in ("INT64", "BYTES"):
            raise InvalidInput(f"input 'categorical': datatype {cat.datatype} is not supported; use BYTES or INT64")
        dense_t = by_name.get("dense")
        if dense_t is None:
            if self.num_dense:
                raise InvalidInput(f"input 'dense' is missing: expected [batch, {self.num_dense}] FP32")
            raw = np.zeros((rows, 0), np.float32)
        else:
            if dense_t.datatype != "FP32":
                raise InvalidInput(f"input 'dense': datatype {dense_t.datatype} is not supported; use FP32")
            if self._tensor_rows(dense_t, self.num_dense, max_instances) != rows:
                raise InvalidInput(
                    f"input 'dense': shape {list(dense_t.shape)} and 'categorical' {list(cat.shape)}"
                    " differ in batch size"
                )
            raw = np.asarray(dense_t.data, dtype=np.float32).reshape(rows, self.num_dense)
        if cat.datatype == "BYTES":
            data = cat.data
            if isinstance(data, BytesElements):  # the binary extension: keys in bulk where the values pack
                packed = data.packed
                if packed is not None:
                    return PackedRows(self, rows, raw, packed.reshape(rows, self.num_fields))
                data = data.strings()
            return RawRows(self, rows, cast("list[float | None]", raw.reshape(-1).tolist()), list(data))
        keys = np.ascontiguousarray(cat.data, dtype=np.int64).reshape(rows, self.num_fields)
        bad = np.flatnonzero((keys < 0) | (keys > KEY_MASK))
        if bad.size:
            r, c = divmod(int(bad[0]), self.num_fields)
            raise InvalidInput(
                f"input 'categorical'[{r}][{c}] ({self.categorical_names[c]}): key {keys[r, c]} is"
                " outside [0, 2**62); send raw values as BYTES, or keys hashed with this model's schema"
            )
        return Batch(transform_dense(raw), keys)

    def _tensor_rows(self, t: Tensor, width: int, max_instances: int) -> int:
        if len(t.shape) != 2 or t.shape[1] != width:
            raise InvalidInput(f"input {t.name!r}: shape {list(t.shape)} is not [batch, {width}]")
        check_count(t.shape[0], max_instances, f"input {t.name!r}")
        if len(t.data) != t.shape[0] * width:
            raise InvalidInput(f"input {t.name!r}: {len(t.data)} values do not fill shape {list(t.shape)}")
        return t.shape[0]


class _Kind:
    """How one kind of feature (dense or categorical) of a schema is checked and what stands for missing."""

    __slots__ = ("accepted", "accepted_or_null", "expected", "index", "key", "missing_row", "names", "shown",
                 "size", "what")  # fmt: skip

    def __init__(self, key: str, what: str, names: tuple[str, ...], accepted: frozenset[type], expected: str) -> None:
        self.key = key  # the instance key: "dense" or "categorical"
        self.what = what  # "feature" or "field", in messages
        self.names = names
        self.size = len(names)
        self.index = {n: j for j, n in enumerate(names)}
        self.accepted = accepted  # exact types (bool is not int here)
        self.accepted_or_null = accepted | {type(None)}
        self.missing_row = [None] * len(names)  # missing values stay None (dense: NaN once in an array)
        self.expected = expected
        self.shown = f"({names[0]}..{names[-1]})" if len(names) > 2 else str(list(names))
