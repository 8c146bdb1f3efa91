"""Native predict bodies -> arrays, in one compiled pass over the bytes (Numba; no Python object per value).

:func:`scan_instances` reads a ``{"instances": [...]}`` body whose instances are in the canonical form,
each ``{"dense": [...], "categorical": [...]}`` (either order; a key whose schema width is 0 may be
left out), with the common values only:

- dense: ``null`` (missing: NaN) or a JSON number. One of at most 15 significant digits and a decimal
  exponent within +-22 gets its float64 in the scan, exactly as a correct parser rounds it (Clinger's
  fast path: the digits and the power of ten are both exact doubles, so one multiplication or division
  rounds once); any other (a float's 17-digit repr) is converted by Python's ``float()`` of its text
  afterwards, and one that is infinite there (orjson refuses it) makes the scan answer None. An integer
  without fraction or exponent is a Python int to orjson, so ``-0`` is 0.0.
- categorical: ``null`` or ``""`` (missing), a string of at most 8 ASCII bytes without escapes, or an
  integer of at most 8 characters (its decimal text: ``1005`` and ``"1005"`` are one token, as
  everywhere). Each is packed into a ``uint64`` for :class:`~models.schema.PackedKeys` (its bytes
  little-endian, zero-padded).

Anything else (whitespace aside) makes the scan answer None: another key, an ``entity``, a value
in another form, a longer token, an escape, a non-ASCII byte, invalid JSON. The caller then parses the body
with orjson and validates it instance by instance (:meth:`server.featurize.Featurizer.parse_body`), so
every error keeps its exact message and the scan only ever takes bodies that path accepts, with the
same values (a hypothesis test compares the two on generated bodies).
"""

from __future__ import annotations

import math

import numpy as np

from models.jit import inline, kernel

_INSTANCES = np.frombuffer(b'"instances"', np.uint8)
_DENSE = np.frombuffer(b'"dense"', np.uint8)
_CATEGORICAL = np.frombuffer(b'"categorical"', np.uint8)
_POW10 = np.array([10.0**k for k in range(23)])  # exact doubles: 10**22 is the largest
_MAX_DIGITS = 15  # below 2**53: exact in float64
_MAX_EXP10 = 22
_MAX_TOKEN = 8  # bytes packed into one uint64
_BAD = -1


@inline
def _ws(buf, p):  # type: ignore[no-untyped-def]
    """The first position at or after p that is not JSON whitespace."""
    n = buf.shape[0]
    # this loop form: the one with a break in its body compiled to code 2.5x slower for the whole scan
    while p < n and (buf[p] == 32 or buf[p] == 10 or buf[p] == 13 or buf[p] == 9):
        p += 1
    return p


@inline
def _starts_with(buf, p, text):  # type: ignore[no-untyped-def]
    """p past ``text`` when the bytes at p are ``text``, else _BAD."""
    if p + text.shape[0] > buf.shape[0]:
        return _BAD
    for k in range(text.shape[0]):
        if buf[p + k] != text[k]:
            return _BAD
    return p + text.shape[0]


@inline
def _pack(buf, s, e):  # type: ignore[no-untyped-def]
    w = np.uint64(0)
    for k in range(e - s):
        w |= np.uint64(buf[s + k]) << np.uint64(8 * k)
    return w


@inline
def _array(buf, p, row, categorical, width, dense, packed, redo):  # type: ignore[no-untyped-def]
    """Read one instance's ``[...]`` of ``width`` values at p into row ``row``; p past it, or _BAD.

    A dense number outside the exact fast path is left NaN and its (flat index, start, end) appended to
    ``redo`` (row 0 counts them) for Python's ``float()``."""
    n = buf.shape[0]
    if p >= n or buf[p] != 91:  # [
        return _BAD
    p = _ws(buf, p + 1)
    if width == 0:
        return p + 1 if p < n and buf[p] == 93 else _BAD
    for j in range(width):
        if p >= n:
            return _BAD
        c = buf[p]
        if c == 110:  # null
            if p + 4 > n or buf[p + 1] != 117 or buf[p + 2] != 108 or buf[p + 3] != 108:
                return _BAD
            p += 4
            if categorical:
                packed[row, j] = 0
            else:
                dense[row, j] = np.nan
        elif c == 34:  # a string: a token of at most 8 ASCII bytes without escapes
            if not categorical:
                return _BAD
            s = p + 1
            p = s
            while True:
                if p >= n:
                    return _BAD
                b = buf[p]
                if b == 34:
                    break
                if b < 32 or b == 92 or b >= 128 or p - s == _MAX_TOKEN:
                    return _BAD
                p += 1
            packed[row, j] = _pack(buf, s, p)
            p += 1
        else:  # a number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
            s = p
            neg = c == 45
            if neg:
                p += 1
            q = p
            m = 0
            while p < n:
                d = np.uint8(buf[p] - 48)  # wraps below "0": one compare for both ends
                if d > 9:
                    break
                m = m * 10 + d
                p += 1
            digits = p - q
            if digits == 0 or (digits > 1 and buf[q] == 48):
                return _BAD
            exp10 = 0
            integer = True
            if p < n and buf[p] == 46:  # .
                integer = False
                p += 1
                q = p
                while p < n:
                    d = np.uint8(buf[p] - 48)
                    if d > 9:
                        break
                    m = m * 10 + d
                    p += 1
                if p == q:
                    return _BAD
                digits += p - q
                exp10 = q - p
            if p < n and (buf[p] == 101 or buf[p] == 69):  # e E
                integer = False
                p += 1
                eneg = False
                if p < n and (buf[p] == 43 or buf[p] == 45):
                    eneg = buf[p] == 45
                    p += 1
                q = p
                e = 0
                while p < n:
                    d = np.uint8(buf[p] - 48)
                    if d > 9:
                        break
                    if p - q < 4:  # more digits than that: redone below
                        e = e * 10 + d
                    p += 1
                if p == q:
                    return _BAD
                exp10 += -e if eneg else e
                if p - q > 3:
                    exp10 = _MAX_EXP10 + 1
            if categorical:  # an integer token, as str(int) writes it; -0 is the int 0: the text "0"
                if not integer or p - s > _MAX_TOKEN or (neg and m == 0):
                    return _BAD
                packed[row, j] = _pack(buf, s, p)
            elif digits > _MAX_DIGITS or exp10 < -_MAX_EXP10 or exp10 > _MAX_EXP10:
                k = redo[0, 0] + 1
                redo[0, 0] = k
                redo[k, 0] = row * width + j
                redo[k, 1] = s
                redo[k, 2] = p
                dense[row, j] = np.nan
            else:
                v = float(m)
                if exp10 < 0:
                    v = v / _POW10[-exp10]
                elif exp10 > 0:
                    v = v * _POW10[exp10]
                dense[row, j] = -v if neg and not (integer and m == 0) else v
        p = _ws(buf, p)
        if p >= n:
            return _BAD
        if j + 1 < width:
            if buf[p] != 44:  # ,
                return _BAD
            p = _ws(buf, p + 1)
        elif buf[p] != 93:  # ]
            return _BAD
    return p + 1


@kernel
def _scan(buf, dense, packed, redo):  # type: ignore[no-untyped-def]
    """The number of instances of the body ``buf`` read into ``dense`` (B, nd) and ``packed`` (B, nf),
    or _BAD when it is not in the form this scan reads or holds more instances than the arrays' rows.
    ``redo``: (B * nd + 1, 3) int64, see :func:`_array`."""
    n = buf.shape[0]
    cap = dense.shape[0]
    nd = dense.shape[1]
    nf = packed.shape[1]
    p = _ws(buf, 0)
    if p >= n or buf[p] != 123:  # {
        return _BAD
    p = _starts_with(buf, _ws(buf, p + 1), _INSTANCES)
    if p == _BAD:
        return _BAD
    p = _ws(buf, p)
    if p >= n or buf[p] != 58:  # :
        return _BAD
    p = _ws(buf, p + 1)
    if p >= n or buf[p] != 91:  # [
        return _BAD
    p = _ws(buf, p + 1)
    redo[0, 0] = 0
    row = 0
    while True:
        if row == cap or p >= n or buf[p] != 123:  # {
            return _BAD
        p = _ws(buf, p + 1)
        seen_dense = False
        seen_categorical = False
        while True:
            q = _starts_with(buf, p, _DENSE)
            if q != _BAD and not seen_dense:
                seen_dense = True
                categorical = False
            else:
                q = _starts_with(buf, p, _CATEGORICAL)
                if q == _BAD or seen_categorical:
                    return _BAD
                seen_categorical = True
                categorical = True
            p = _ws(buf, q)
            if p >= n or buf[p] != 58:  # :
                return _BAD
            p = _ws(buf, p + 1)
            p = _array(buf, p, row, categorical, nf if categorical else nd, dense, packed, redo)
            if p == _BAD:
                return _BAD
            p = _ws(buf, p)
            if p >= n:
                return _BAD
            if buf[p] == 125:  # }
                break
            if buf[p] != 44:  # ,
                return _BAD
            p = _ws(buf, p + 1)
        if (not seen_dense and nd) or (not seen_categorical and nf):
            return _BAD
        row += 1
        p = _ws(buf, p + 1)
        if p >= n:
            return _BAD
        if buf[p] == 93:  # ]
            break
        if buf[p] != 44:  # ,
            return _BAD
        p = _ws(buf, p + 1)
    p = _ws(buf, p + 1)
    if p >= n or buf[p] != 125:  # }
        return _BAD
    return row if _ws(buf, p + 1) == n else _BAD


def scan_instances(
    body: bytes, num_dense: int, num_fields: int, max_instances: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(float64 (B, num_dense) raw dense values, NaN = missing; uint64 (B, num_fields) packed tokens) of a
    canonical predict body of 1 to ``max_instances`` instances, or None (see the module docstring)."""
    # every instance takes more than 2 bytes a value (a value and a comma), so this bounds B from above
    cap = min(max_instances, len(body) // (2 * (num_dense + num_fields) + 2) + 1)
    dense = np.empty((cap, num_dense), np.float64)
    packed = np.empty((cap, num_fields), np.uint64)
    redo = np.empty((cap * num_dense + 1, 3), np.int64)
    rows = _scan(np.frombuffer(body, np.uint8), dense, packed, redo)
    if rows == _BAD:
        return None
    if redo[0, 0]:
        flat = dense.reshape(-1)
        for i, start, end in redo[1 : redo[0, 0] + 1].tolist():
            v = float(body[start:end])  # correctly rounded, as orjson's parse (an integer: as its int's float)
            if math.isinf(v):
                return None  # orjson refuses it: "number is infinity when parsed as double"
            flat[i] = v
    return dense[:rows], packed[:rows]


def warm() -> None:
    """Compile (or load from the cache) the scan now: a model load pays it, not a first request."""
    scan_instances(b'{"instances": [{"dense": [1], "categorical": ["a"]}]}', 1, 1, 1)
