"""Opaque paging cursors of ``GET /api/v1/orgs``: the query a page came from, and where the next begins.

A cursor is base64url of a small JSON object: ``q``, the query it binds (metric, range, order, limit,
status and a digest of the token's scope), ``k``, the key of the last org returned (keyset paging, never an
offset), and ``c``, what the pages must still agree on (the points a total ranking was cut from, or the
time of an org-health snapshot). It is neither secret nor signed: it names a position, and a token reads
only its own orgs whatever cursor it sends. Anything that is not a cursor this module wrote, field for
field and type for type, is :class:`BadCursor` (a 400): every value in it then reaches ClickHouse as a bound
parameter, like any other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

VERSION = 1
#: Longest cursor accepted: an org id and a metric of 1024 characters each (the API's longest), in its
#: query and its key, as JSON escapes them at worst (6 bytes a control character), in base64; within the
#: HTTP port's 64 KiB of headers. At 12,288 the API refused the cursor it gave after an org id of 620
#: characters, and every org after it was out of reach (adversary 38).
MAX_CHARS = 32_768
_KEYS = {"v", "q", "k", "c"}
#: The largest check a cursor carries (a count of points, or a time in milliseconds).
MAX_CHECK = 2**64 - 1


class BadCursor(ValueError):
    """Not a cursor of this API (garbled, forged, of another version): a 400."""


@dataclass(frozen=True)
class Cursor:
    query: dict[str, Any]  # str, int or None values: the query the cursor continues
    key: tuple[Any, ...]  # the last org's sort key: (org,) or (total, org), or (position,) in a snapshot
    check: int  # what the pages must agree on (0 when nothing)

    def expect(self, shape: dict[str, Any], key: tuple[Any, ...]) -> Cursor:
        """This cursor, when its query has exactly the fields of ``shape`` (each a type or a tuple of
        types) and its key the types of ``key``; :class:`BadCursor` otherwise."""
        if set(self.query) != set(shape):
            raise BadCursor("not a cursor of this query (its fields)")
        for name, kind in shape.items():
            if not _is(self.query[name], kind):
                raise BadCursor(f"not a cursor of this API ({name})")
        if len(self.key) != len(key) or not all(_is(v, t) for v, t in zip(self.key, key, strict=True)):
            raise BadCursor("not a cursor of this API (its key)")
        return self


def scope_digest(orgs: tuple[str, ...] | None) -> str:
    """Names a token's scope in a cursor (``*`` for every org) without listing its orgs."""
    if orgs is None:
        return "*"
    return hashlib.sha256(json.dumps(sorted(orgs)).encode()).hexdigest()[:16]


def encode(cursor: Cursor) -> str:
    body = {"v": VERSION, "q": cursor.query, "k": list(cursor.key), "c": cursor.check}
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(text: str) -> Cursor:
    """The cursor in ``text``, checked for its structure only (:meth:`Cursor.expect` checks its fields);
    :class:`BadCursor` when it is not one."""
    if not text or len(text) > MAX_CHARS or not text.isascii():
        raise BadCursor("not a cursor of this API")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise BadCursor("not a cursor of this API (garbled)") from None
    if not isinstance(body, dict) or set(body) != _KEYS or body["v"] != VERSION:
        raise BadCursor("not a cursor of this API (or of another version)")
    query, key, check = body["q"], body["k"], body["c"]
    if (
        not isinstance(query, dict)
        or not isinstance(key, list)
        or not _is(check, int)
        or not 0 <= check <= MAX_CHECK
    ):
        raise BadCursor("not a cursor of this API")
    return Cursor(query, tuple(key), check)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # JSON true is not a number here
        return bool in kinds
    if isinstance(value, int) and int in kinds:
        return -(2**63) <= value < 2**64
    if isinstance(value, float) and float in kinds:
        return math.isfinite(value)
    if isinstance(value, str) and str in kinds:
        return len(value) <= 1024
    return value is None and type(None) in kinds


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
