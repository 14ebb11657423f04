"""Content-Encoding of OTLP/HTTP request bodies: gzip, deflate and zstd, each inflated to at most a limit.

What senders send: the OpenTelemetry SDKs gzip (the Python SDK also offers deflate, which is
``zlib.compress``: the zlib format of RFC 1950, as RFC 9110 defines ``deflate``); the Collector's exporters
send gzip, deflate (Go's ``compress/zlib``, RFC 1950 again) or zstd. Raw deflate without the zlib wrapper
is sent by none of them and is refused as a corrupt deflate body.

A body is inflated incrementally, and inflating stops as soon as the output passes the limit, so a bomb
(1 GiB of zeros is 1 MB of gzip and 32 KB of zstd) costs about the limit in memory, never its full size. A
stream may hold several gzip members (RFC 1952) or zstd frames (RFC 8878, skippable ones too), at most
:data:`MAX_MEMBERS`: each costs a fresh decompressor, so a body of thousands of empty members would cost
seconds of a worker for nothing; no sender makes more than a few. Several codings in one request
(``Content-Encoding: gzip, zstd``, or two headers) are refused: no OpenTelemetry sender stacks them, and
each layer would need its own bound.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final

import zstandard


class Encoding(enum.StrEnum):
    IDENTITY = "identity"
    GZIP = "gzip"
    DEFLATE = "deflate"
    ZSTD = "zstd"


#: "A recipient SHOULD consider x-gzip to be equivalent to gzip" (RFC 9110, 8.4.1.3).
_ALIASES: Final = {"x-gzip": Encoding.GZIP}

#: The codings a sender may use, for the 415 answer and its ``Accept-Encoding`` header (RFC 7694).
ACCEPTED: Final = ", ".join(e.value for e in Encoding if e is not Encoding.IDENTITY)

#: Gzip members or zstd frames in one body, at most.
MAX_MEMBERS: Final = 1000

#: Compressed bytes given to a decompressor at a time: what a member's leftover input costs to copy.
_CHUNK: Final = 64 * 1024

#: libzstd's default bound on a frame's window (ZSTD_WINDOWLOG_LIMIT_DEFAULT, 128 MiB); the Collector's
#: encoder uses 8 MiB. The window is allocated but only touched as output is written.
ZSTD_MAX_WINDOW: Final = 1 << 27

#: zstd's largest output per input byte: a 4-byte RLE block (3-byte header, 1 byte) makes 128 KiB.
_ZSTD_MAX_RATIO: Final = 32 * 1024
#: The smallest zstd input step: past the limit, output stops within 64 * 32 KiB + one block (2.1 MiB).
_ZSTD_MIN_STEP: Final = 64
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE: Final = b"\x2a\x4d\x18"  # after a first byte 0x50-0x5F
_GZIP_MAGIC: Final = b"\x1f\x8b"


class UnsupportedEncoding(Exception):
    """A Content-Encoding meterhouse does not take (415)."""


class TooLarge(Exception):
    """The inflated body passes the limit (413)."""


class CorruptBody(Exception):
    """The body is not a whole stream of its encoding (400)."""


def content_encoding(values: Iterable[bytes]) -> Encoding:
    """The one coding that a request's Content-Encoding header fields name together (none: identity).

    Repeated fields are one comma-separated list (RFC 9110), so ``gzip`` twice is two codings.
    """
    codings = [c.strip().lower() for v in values for c in v.decode("latin-1").split(",")]
    codings = [c for c in codings if c]
    accepted = f"accepted: {ACCEPTED} (or none)"
    if len(codings) > 1:
        listed = ", ".join(codings)[:100]
        raise UnsupportedEncoding(f"one Content-Encoding at a time, got {listed!r}; {accepted}")
    if not codings:
        return Encoding.IDENTITY
    coding = _ALIASES.get(codings[0], codings[0])
    try:
        return Encoding(coding)
    except ValueError:
        raise UnsupportedEncoding(f"unsupported Content-Encoding {coding[:100]!r}; {accepted}") from None


#: The most deflate inflates one byte to (RFC 1951's longest match in its shortest code).
DEFLATE_MAX_RATIO = 1032


def inflating_cost(encoding: Encoding, size: int, limit: int) -> int:
    """The most inflating a body of ``size`` bytes may hold: what it inflates to, at most ``limit``
    bytes (the deflate ratio bounds gzip and deflate; zstd's frames have no such bound), twice: the
    pieces, then them joined."""
    if encoding is Encoding.IDENTITY:
        return size
    most = limit if encoding is Encoding.ZSTD else min(limit, size * DEFLATE_MAX_RATIO)
    return size + 2 * most


def inflate(encoding: Encoding, body: bytes, limit: int) -> bytes:
    """``body`` decoded: :class:`TooLarge` once the output passes ``limit`` bytes, :class:`CorruptBody`
    for anything but whole members (or frames) of ``encoding`` back to back."""
    if encoding is Encoding.GZIP:
        return _members(body, limit, "gzip member", _is_gzip, partial(_zlib_stream, gzip=True))
    if encoding is Encoding.DEFLATE:
        return _members(body, limit, "zlib stream", lambda _: False, partial(_zlib_stream, gzip=False))
    if encoding is Encoding.ZSTD:
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        return _members(body, limit, "zstd frame", _is_zstd_frame, partial(_zstd_frame, dctx=dctx))
    return body


#: Inflates the member at the start of its input, at most ``budget`` bytes: (output, input consumed).
_Member = Callable[[memoryview, int], tuple[list[bytes], int]]


def _members(
    body: bytes, limit: int, what: str, is_next: Callable[[memoryview], bool], one: _Member
) -> bytes:
    """Members back to back, bounded together. Anything after one but another is refused: a 200 for part
    of a body would lose acknowledged usage."""
    view, pos, out, total = memoryview(body), 0, [], 0
    for _ in range(MAX_MEMBERS):
        parts, used = one(view[pos:], limit - total)
        out += parts
        total += sum(map(len, parts))
        pos += used
        if pos == len(view):
            return b"".join(out)
        if not is_next(view[pos:]):
            raise CorruptBody(f"{len(view) - pos} bytes of trailing data after a {what}")
    raise CorruptBody(f"more than {MAX_MEMBERS} {what}s in one body")


def _is_gzip(data: memoryview) -> bool:
    return data[:2].tobytes() == _GZIP_MAGIC


def _is_zstd_frame(data: memoryview) -> bool:
    return data[:4].tobytes() == _ZSTD_MAGIC or (
        len(data) >= 4 and data[0] >> 4 == 5 and data[1:4].tobytes() == _ZSTD_SKIPPABLE
    )


def _zlib_stream(data: memoryview, budget: int, gzip: bool) -> tuple[list[bytes], int]:
    """One gzip member or zlib stream, fed a chunk at a time so its leftover input is never copied whole."""
    name = "gzip" if gzip else "deflate"
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
    out, total, pos = [], 0, 0
    try:
        while not d.eof:
            if pos == len(data):
                raise CorruptBody(f"invalid {name} body: truncated stream")
            chunk = data[pos : pos + _CHUNK]
            part = d.decompress(chunk, budget - total + 1)
            total += len(part)
            if total > budget:  # with input left over (unconsumed_tail) or not
                raise TooLarge
            out.append(part)
            pos += len(chunk) - len(d.unconsumed_tail) - len(d.unused_data)
    except zlib.error as e:
        hint = "" if gzip else "; deflate is the zlib format (RFC 1950), as OpenTelemetry senders send it"
        raise CorruptBody(f"invalid {name} body: {e}{hint}") from None
    return out, pos


def _zstd_frame(data: memoryview, budget: int, dctx: zstandard.ZstdDecompressor) -> tuple[list[bytes], int]:
    """One zstd frame, fed in steps small enough that no step can inflate far past the budget."""
    try:
        frame = zstandard.get_frame_parameters(data[:18])  # the longest frame header
    except zstandard.ZstdError as e:
        raise CorruptBody(f"invalid zstd body: {e}") from None
    if data[:4].tobytes() == _ZSTD_MAGIC:  # not a skippable frame, whose "content size" is what it skips
        size, window = frame.content_size, frame.window_size
        if size != zstandard.CONTENTSIZE_UNKNOWN and size > budget:
            raise TooLarge(f"a zstd frame declares {size} decompressed bytes")
        if window > ZSTD_MAX_WINDOW:
            raise TooLarge(f"a zstd frame needs a window of {window} bytes, more than {ZSTD_MAX_WINDOW}")
    d = dctx.decompressobj()
    out, total, pos = [], 0, 0
    try:
        while not d.eof:
            if pos == len(data):
                raise CorruptBody("invalid zstd body: truncated frame")
            step = min(_CHUNK, max(_ZSTD_MIN_STEP, (budget - total + 1) // _ZSTD_MAX_RATIO))
            piece = data[pos : pos + step]
            part = d.decompress(piece)
            total += len(part)
            if total > budget:
                raise TooLarge
            out.append(part)
            pos += len(piece) - len(d.unused_data)
    except zstandard.ZstdError as e:
        raise CorruptBody(f"invalid zstd body: {e}") from None
    return out, pos
