"""ClickHouse's Native format for the column types the ingest tables use: what the spool stores and what
the writer sends.

A block is self-describing (column names and types precede the values), so a spool record written by
an older column set is read back by name (see ``collector/spool.py``). ``encode`` uses the C encoder
(``_native.c``) when it is built and this module's pure-Python one otherwise; ``decode`` is for the rare
paths that need Python values back (the state rebuilt at start, dead letters). Layout per block: LEB128
column count, LEB128 row count, then per column LEB128-prefixed name and type and the values (see
``_native.c`` for each type's layout).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import Any, cast

try:
    from meterhouse.core._native import BlockTooLarge as _CBlockTooLarge
    from meterhouse.core._native import concat_blocks as _c_concat
    from meterhouse.core._native import group_summary as _c_summary
    from meterhouse.core._native import keyset_add as _c_keyset_add
    from meterhouse.core._native import native_block as _c_encode
    from meterhouse.core._native import split_blocks as _c_split
except ImportError:  # pragma: no cover - built by `pip install`; the suite requires it
    _c_encode = None
    _c_concat = None
    _c_summary = None
    _c_keyset_add = None
    _c_split = None
    _CBlockTooLarge = None


class BlockTooLarge(ValueError):
    """The block would be larger than the bound it was encoded under (nothing beyond it is allocated)."""


#: Types both encoders support (DateTime64(...) columns are written as Int64 nanoseconds).
SCALAR_SIZES = {"UInt8": 1, "Int32": 4, "Int64": 8, "UInt64": 8, "Float64": 8}
_ARRAY_CODES = {"UInt8": "B", "Int32": "i", "Int64": "q", "UInt64": "Q", "Float64": "d"}
ARRAYS = ("Array(String)", "Array(UInt64)", "Array(Float64)")


def supported(column_type: str) -> bool:
    return (
        column_type in SCALAR_SIZES
        or column_type in ("String", "Nullable(Float64)")
        or column_type in ARRAYS
        or column_type.startswith("DateTime64(")
    )


def _base(column_type: str) -> str:
    return "Int64" if column_type.startswith("DateTime64(") else column_type


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode()
    return _leb128(len(raw)) + raw


def _values(column_type: str, values: Sequence[Any], budget: float = float("inf")) -> bytes:
    """The column's values; :class:`BlockTooLarge` when they would take more than ``budget`` bytes."""
    t = _base(column_type)
    if t == "String":
        out, size = [], 0
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"expected str, got {type(v).__name__}")
            out.append(_string(v))
            size += len(out[-1])
            if size > budget:
                raise BlockTooLarge(f"the block passes its limit ({size} bytes of strings so far)")
        return b"".join(out)
    if t in _ARRAY_CODES:
        return array(_ARRAY_CODES[t], values).tobytes()  # raises OverflowError/TypeError like the C one
    if t == "Nullable(Float64)":
        nulls = bytes(1 if v is None else 0 for v in values)
        return nulls + array("d", [0.0 if v is None else v for v in values]).tobytes()
    if t in ARRAYS:
        ends: list[int] = []
        flat: list[Any] = []
        end = 0
        for row in values:
            if not isinstance(row, list | tuple):
                raise TypeError(f"expected a list, got {type(row).__name__}")
            end += len(row)
            ends.append(end)
            flat.extend(row)
        offsets = array("Q", ends).tobytes()
        return offsets + _values(t[len("Array(") : -1], flat, budget - len(offsets))
    raise ValueError(f"unsupported column type {column_type}")


def encode_python(
    names: Sequence[str], types: Sequence[str], columns: Sequence[Sequence[Any]], max_bytes: int = -1
) -> bytes:
    """The pure-Python encoder (the reference the C one is tested against)."""
    rows = len(columns[0]) if columns else 0
    if len(names) != len(types) or len(names) != len(columns):
        raise ValueError("names, types and columns differ in length")
    out = [_leb128(len(names)), _leb128(rows)]
    size = len(out[0]) + len(out[1])
    for name, column_type, values in zip(names, types, columns, strict=True):
        if len(values) != rows:
            raise ValueError("columns differ in length")
        head = [_string(name), _string(column_type)]
        size += len(head[0]) + len(head[1])
        try:
            data = _values(column_type, values, max_bytes - size if max_bytes >= 0 else float("inf"))
        except (TypeError, OverflowError, ValueError) as e:
            raise type(e)(f"column {name} ({column_type}): {e}") from e
        size += len(data)
        if 0 <= max_bytes < size:
            raise BlockTooLarge(
                f"column {name} ({column_type}): the block passes its limit of {max_bytes} bytes"
            )
        out += [*head, data]
    return b"".join(out)


def encode(
    names: Sequence[str], types: Sequence[str], columns: Sequence[Sequence[Any]], max_bytes: int = -1
) -> bytes:
    """One Native block of the columns (C encoder when built); :class:`BlockTooLarge`, before more is
    allocated, when it would take more than ``max_bytes`` (-1: no bound)."""
    if _c_encode is not None:
        try:
            return cast("bytes", _c_encode(names, types, columns, max_bytes))
        except _CBlockTooLarge as e:
            raise BlockTooLarge(str(e)) from None
    return encode_python(names, types, columns, max_bytes)


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def leb128(self) -> int:
        n = shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                return n
            shift += 7

    def raw(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError("Native block is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def fixed(self, code: str, n: int) -> list[Any]:
        out = array(code)
        out.frombytes(self.raw(n))
        return out.tolist()

    def string(self) -> str:
        return bytes(self.raw(self.leb128())).decode()

    def values(self, column_type: str, rows: int) -> list[Any]:
        t = _base(column_type)
        if t == "String":
            return [self.string() for _ in range(rows)]
        if t in _ARRAY_CODES:
            return self.fixed(_ARRAY_CODES[t], rows * SCALAR_SIZES[t])
        if t == "Nullable(Float64)":
            nulls = bytes(self.raw(rows))
            values = self.fixed("d", rows * 8)
            return [None if null else v for null, v in zip(nulls, values, strict=True)]
        if t in ARRAYS:
            ends = self.fixed("Q", rows * 8)
            flat = self.values(t[len("Array(") : -1], ends[-1] if ends else 0)
            out, start = [], 0
            for end in ends:
                out.append(flat[start:end])
                start = end
            return out
        raise ValueError(f"unsupported column type {column_type}")


def decode(data: bytes | memoryview) -> tuple[list[str], list[str], dict[str, list[Any]], int]:
    """A block's (names, types, columns by name, rows)."""
    r = _Reader(data)
    ncols, rows = r.leb128(), r.leb128()
    names, types, columns = [], [], {}
    for _ in range(ncols):
        name, column_type = r.string(), r.string()
        names.append(name)
        types.append(column_type)
        columns[name] = r.values(column_type, rows)
    if r.pos != len(r.data):
        raise ValueError("Native block has trailing bytes")
    return names, types, columns, rows


def split(data: bytes) -> list[bytes]:
    """Native blocks written one after another, each on its own (C when built)."""
    if _c_split is not None:
        ends = cast("list[int]", _c_split(data))
    else:
        ends, r = [], _Reader(data)
        while r.pos < len(r.data):
            ncols, rows = r.leb128(), r.leb128()
            for _ in range(ncols):
                r.string()
                r.values(r.string(), rows)
            ends.append(r.pos)
    starts = [0, *ends[:-1]]
    return [data[a:b] for a, b in zip(starts, ends, strict=True)]


def concat_python(blocks: Sequence[bytes]) -> bytes:
    """The pure-Python :func:`concat` (the reference the C one is tested against)."""
    if not blocks:
        raise ValueError("no blocks to concatenate")
    decoded = [decode(b) for b in blocks]
    names, types = decoded[0][0], decoded[0][1]
    if any(d[0] != names or d[1] != types for d in decoded):
        raise ValueError("the blocks differ in their columns")
    return encode_python(names, types, [[v for d in decoded for v in d[2][n]] for n in names])


def concat(blocks: Sequence[bytes]) -> bytes:
    """Blocks of the same columns as one block holding all their rows, in order (C when built): the
    same bytes :func:`encode` makes of the columns concatenated. ValueError for blocks that are
    truncated or differ in their columns."""
    if len(blocks) == 1:
        return blocks[0]
    if _c_concat is not None:
        return cast("bytes", _c_concat(blocks))
    return concat_python(blocks)


def with_constant(block: bytes, rows: int, name: str, column_type: str, value: str | int) -> bytes:
    """The block with one more column holding ``value`` in every row: a String (the writer's batch_id)
    or a UInt64 (its batch_seq)."""
    if column_type == "String":
        cell = _string(str(value))
    elif column_type == "UInt64" and isinstance(value, int):
        cell = struct.pack("<Q", value)
    else:
        raise ValueError("only String and UInt64 constants are supported")
    r = _Reader(block)
    ncols = r.leb128()
    head = r.pos
    return b"".join((_leb128(ncols + 1), block[head:], _string(name), _string(column_type), cell * rows))


def with_flags(block: bytes, name: str, flags: Sequence[int]) -> bytes:
    """The block with one more UInt8 column holding ``flags`` (one per row, each 0 or 1)."""
    r = _Reader(block)
    ncols = r.leb128()
    head = r.pos
    return b"".join((_leb128(ncols + 1), block[head:], _string(name), _string("UInt8"), bytes(flags)))


def rows_of(block: bytes) -> int:
    r = _Reader(block)
    r.leb128()
    return r.leb128()


_M64 = 2**64 - 1


def _hash_bytes(h: int, data: bytes, seed: int) -> int:
    h ^= (len(data) * 0x9E3779B97F4A7C15 + seed) & _M64
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & _M64
    return h ^ (h >> 33)


def hour_of(ns: int) -> int:
    """The start of a time's hour, in seconds (``toStartOfHour``)."""
    return ns // 3_600_000_000_000 * 3600


def set_key(
    org: str, metric: str, keys: Sequence[str], values: Sequence[str], hour: int, kind: str = "sum"
) -> bytes:
    """The 16-byte key of an (attribute set, hour) pair of a kind of point (two 64-bit hashes), as
    ``_native.group_summary`` makes it."""
    o, m = org.encode("utf-8", "surrogateescape"), metric.encode("utf-8", "surrogateescape")
    h1 = _hash_bytes(_hash_bytes(0, o, 4), m, 5) ^ ((len(keys) * 0x9E3779B97F4A7C15) & _M64)
    h2 = _hash_bytes(_hash_bytes(7, m, 8), o, 9) ^ ((len(values) * 0xC2B2AE3D27D4EB4F) & _M64)
    for k in keys:
        raw = k.encode("utf-8", "surrogateescape")
        h1, h2 = _hash_bytes(h1, raw, 10), _hash_bytes(h2, raw, 11)
    for v in values:
        raw = v.encode("utf-8", "surrogateescape")
        h1, h2 = _hash_bytes(h1, raw, 12), _hash_bytes(h2, raw, 13)
    hb = struct.pack("<q", hour)
    raw_kind = kind.encode("utf-8", "surrogateescape")
    h1, h2 = (
        _hash_bytes(_hash_bytes(h1, hb, 14), raw_kind, 16),
        _hash_bytes(_hash_bytes(h2, hb, 15), raw_kind, 17),
    )
    key = bytearray(struct.pack("<QQ", h1, h2))
    key[0] |= 1
    return bytes(key)


class KeySet:
    """Attribute-set keys the writer has stored (``group_summary``), in a fixed table of 16-byte slots:
    bounded memory, emptied when it is 70% full (the sets then seen are stored again: a repeat the
    ``attribute_sets`` table keeps once)."""

    def __init__(self, slots: int = 1 << 21) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.slots = slots
        self.table = bytearray(16 * slots)
        self.count = 0

    def add(self, keys: Sequence[bytes]) -> None:
        if self.count + len(keys) > self.slots * 7 // 10:
            self.table = bytearray(16 * self.slots)
            self.count = 0
            keys = keys[: self.slots * 7 // 10]
        if _c_keyset_add is not None:
            self.count += int(_c_keyset_add(self.table, list(keys)))
            return
        for key in keys:
            self.count += self._add_python(key)

    def _slot(self, key: bytes) -> int:
        mask = self.slots - 1
        s = int(struct.unpack_from("<Q", key, 8)[0]) & mask
        while True:
            cell = self.table[16 * s : 16 * s + 16]
            if cell == key or not any(cell):
                return s
            s = (s + 1) & mask

    def _add_python(self, key: bytes) -> int:
        s = self._slot(key)
        if self.table[16 * s : 16 * s + 16] == key:
            return 0
        self.table[16 * s : 16 * s + 16] = key
        return 1

    def __contains__(self, key: bytes) -> bool:
        return self.table[16 * (s := self._slot(key)) : 16 * s + 16] == key


#: What ``group_summary`` returns: per org (name, first time, last time, points) when asked, per
#: (metric, kind) (metric, kind, last unit, last time, points), and the new attribute sets' block and keys.
OrgRow = tuple[str, int, int, int]
CatalogRow = tuple[str, str, str, int, int]
Summary = tuple[list[OrgRow] | None, list[CatalogRow], bytes, list[bytes], bytes]

SET_NAMES = ("org_id", "metric", "attr_keys", "attr_values")
SET_TYPES = ("String", "String", "Array(String)", "Array(String)")
PAIR_NAMES = ("metric", "hour", "org_id", "attr_keys", "attr_values")
PAIR_TYPES = ("String", "DateTime('UTC')", "String", "Array(String)", "Array(String)")


def group_summary_python(block: bytes, seen: KeySet, orgs: bool) -> Summary:
    """The pure-Python :func:`group_summary` (the reference the C one is tested against)."""
    _names, _types, cols, rows = decode(block)
    by_org: dict[str, list[int]] = {}
    by_metric: dict[tuple[str, str], list[Any]] = {}
    sets: dict[bytes, int] = {}
    for i in range(rows):
        t = cols["time"][i]
        if orgs:
            o = by_org.setdefault(cols["org_id"][i], [t, t, 0])
            o[0], o[1], o[2] = min(o[0], t), max(o[1], t), o[2] + 1
        c = by_metric.setdefault((cols["metric"][i], cols["kind"][i]), ["", t, 0])
        c[0], c[1], c[2] = cols["unit"][i], max(c[1], t), c[2] + 1
        org, metric = cols["org_id"][i], cols["metric"][i]
        key = set_key(org, metric, cols["attr_keys"][i], cols["attr_values"][i], hour_of(t), cols["kind"][i])
        if key not in sets and key not in seen:
            sets[key] = i
    rows_ = list(sets.values())
    picked = [[cols[n][i] for i in rows_] for n in SET_NAMES]
    block_ = encode_python(SET_NAMES, SET_TYPES, picked) if rows_ else b""
    sums = [i for i in rows_ if cols["kind"][i] == "sum"]
    hours = [min(max(hour_of(cols["time"][i]), 0), 2**32 - 1) for i in sums]
    pairs = [[cols["metric"][i] for i in sums], hours, *([cols[n][i] for i in sums] for n in PAIR_NAMES[2:])]
    return (
        sorted((k, *v) for k, v in by_org.items()) if orgs else None,  # type: ignore[misc]
        sorted((m, k, *v) for (m, k), v in by_metric.items()),  # type: ignore[misc]
        block_,
        list(sets),
        _encode_pairs(pairs) if sums else b"",
    )


def _encode_pairs(columns: list[list[Any]]) -> bytes:
    """The cardinality pairs' block (``DateTime`` is 4 bytes of seconds; not an ingest type)."""
    out = [_leb128(len(PAIR_NAMES)), _leb128(len(columns[0]))]
    for name, column_type, values in zip(PAIR_NAMES, PAIR_TYPES, columns, strict=True):
        seconds = column_type.startswith("DateTime(")
        data = array("I", values).tobytes() if seconds else _values(column_type, values)
        out += [_string(name), _string(column_type), data]
    return b"".join(out)


def group_summary(block: bytes, seen: KeySet, orgs: bool) -> Summary:
    """What the writer derives from a group's block (C when built): per org its first and last point time
    and points (when ``orgs``), per (metric, kind) its last unit, last time and points, and the block's
    distinct (attribute set, hour) pairs not in ``seen``: their sets (a Native block for
    ``attribute_sets``), their keys (to add to ``seen`` once stored) and those of sums as a block for the
    attribute-cardinality views (``PAIR_NAMES``). The lists are in no particular order."""
    if _c_summary is not None:
        return cast("Summary", _c_summary(block, seen.table, orgs))
    return group_summary_python(block, seen, orgs)
