"""OTLP/HTTP Content-Encodings, in process: which header values name which coding, and each coding inflated
within its limit (exactly at it, members together, bombs stopped without holding their size), whole
streams only, at most MAX_MEMBERS members. Against a real `meterhouse up`: tests/test_content_encoding.py."""

import gzip
import struct
import tracemalloc
import zlib

import pytest
import zstandard
from otlp_builders import ENCODERS, zstd_compress

from meterhouse.collector.receivers.compression import (
    ACCEPTED,
    MAX_MEMBERS,
    ZSTD_MAX_WINDOW,
    CorruptBody,
    Encoding,
    TooLarge,
    UnsupportedEncoding,
    content_encoding,
    inflate,
)

MIB = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [([], "identity"), ([b""], "identity"), ([b"gzip"], "gzip"), ([b"Deflate"], "deflate"),
     ([b" ZSTD "], "zstd"), ([b"identity"], "identity"), ([b"gzip,"], "gzip"), ([b"x-gzip"], "gzip")],
)  # fmt: skip
def test_content_encoding_names_one_coding(headers, expected):
    assert content_encoding(headers) == expected


@pytest.mark.parametrize(
    "headers", [[b"br"], [b"snappy"], [b"gzip, zstd"], [b"identity, gzip"], [b"gzip", b"gzip"], [b"a" * 5000]]
)
def test_unknown_or_stacked_codings_are_refused_naming_the_accepted_ones(headers):
    with pytest.raises(UnsupportedEncoding) as e:
        content_encoding(headers)
    assert ACCEPTED == "gzip, deflate, zstd" and ACCEPTED in str(e.value)
    assert len(str(e.value)) < 300  # a sender's header is quoted, cut short


@pytest.mark.parametrize("name", ENCODERS)
def test_each_coding_is_inflated_up_to_its_limit_exactly(name):
    data = bytes(range(256)) * 40
    body = ENCODERS[name](data)
    assert inflate(Encoding(name), body, len(data)) == data
    with pytest.raises(TooLarge):
        inflate(Encoding(name), body, len(data) - 1)


@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_members_are_bounded_together(name):
    """RFC 1952 allows several gzip members, RFC 8878 several zstd frames: each fits, the total may not."""
    two = ENCODERS[name](b"a" * 600) + ENCODERS[name](b"b" * 600)
    assert inflate(Encoding(name), two, 1200) == b"a" * 600 + b"b" * 600
    with pytest.raises(TooLarge):
        inflate(Encoding(name), two, 1000)


@pytest.mark.parametrize("name", ENCODERS)
def test_at_most_max_members(name):
    one = ENCODERS[name](b"")
    if name == "deflate":  # one zlib stream: a second one is trailing data
        with pytest.raises(CorruptBody, match="trailing"):
            inflate(Encoding.DEFLATE, one * 2, 100)
        return
    assert inflate(Encoding(name), one * MAX_MEMBERS, 100) == b""
    with pytest.raises(CorruptBody, match=f"more than {MAX_MEMBERS}"):
        inflate(Encoding(name), one * (MAX_MEMBERS + 1), 100)


def zstd_zeros(n: int, declare_size: bool) -> bytes:
    c = zstandard.ZstdCompressor(write_content_size=declare_size).compressobj(size=n if declare_size else -1)
    return b"".join(c.compress(bytes(MIB)) for _ in range(n // MIB)) + c.flush()


BOMBS = {  # 256 MiB of zeros each: 1.1 MB of gzip or deflate (level 1), 8 KB of zstd
    "gzip": lambda: gzip.compress(bytes(256 * MIB), 1),
    "deflate": lambda: zlib.compress(bytes(256 * MIB), 1),
    "zstd": lambda: zstd_zeros(256 * MIB, declare_size=False),
}


@pytest.mark.parametrize("name", BOMBS)
def test_a_bomb_is_stopped_near_the_limit(name):
    """What inflating holds (Python's allocations, tracemalloc) stays near the 1 MiB limit, never 256 MiB."""
    bomb = BOMBS[name]()
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            inflate(Encoding(name), bomb, MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, peak  # zstd may pass the limit by 2.1 MiB (its steps), zlib by one byte


def test_a_zstd_frame_declaring_more_than_the_limit_is_refused_from_its_header():
    c = zstandard.ZstdCompressor().compressobj(size=1024 * MIB)
    start = c.compress(bytes(MIB)) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # its first MiB of zeros
    with pytest.raises(TooLarge, match="declares 1073741824 decompressed bytes"):
        inflate(Encoding.ZSTD, start, MIB)


def window_frame(window_log: int) -> bytes:
    """A frame of one raw block, b"x", whose header asks for a 2**window_log byte window."""
    descriptor = (window_log - 10) << 3  # exponent above 2**10, mantissa 0 (RFC 8878, 3.1.1.1.2)
    last_raw_block_of_one_byte = (1 | 0 << 1 | 1 << 3).to_bytes(3, "little")
    return ZSTD_MAGIC + b"\x00" + bytes([descriptor]) + last_raw_block_of_one_byte + b"x"


def test_a_zstd_window_is_bounded():
    assert inflate(Encoding.ZSTD, window_frame(27), 10) == b"x"  # allocated, never touched beyond 1 byte
    assert 1 << 28 > ZSTD_MAX_WINDOW
    with pytest.raises(TooLarge, match="window of 268435456 bytes"):
        inflate(Encoding.ZSTD, window_frame(28), 10)


def test_skippable_zstd_frames_are_skipped():
    skippable = struct.pack("<II", 0x184D2A5F, 3) + b"abc"
    assert inflate(Encoding.ZSTD, skippable + zstd_compress(b"data") + skippable, 4) == b"data"


def with_byte_flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


DATA = b"usage " * 100
CORRUPT = [
    ("gzip", b"", "truncated"),
    ("gzip", gzip.compress(DATA)[:-3], "truncated"),
    ("gzip", with_byte_flipped(gzip.compress(DATA), -5), "incorrect data check"),
    ("gzip", gzip.compress(DATA) + b"garbage!", "8 bytes of trailing data after a gzip member"),
    ("deflate", b"plain bytes", "RFC 1950"),
    ("deflate", raw_deflate(DATA), "RFC 1950"),
    ("deflate", zlib.compress(DATA)[:-1], "truncated"),
    ("deflate", with_byte_flipped(zlib.compress(DATA), -1), "incorrect data check"),
    ("deflate", zlib.compress(DATA) + zlib.compress(DATA), "trailing data after a zlib stream"),
    ("zstd", b"", "zstd"),
    ("zstd", b"plain bytes", "zstd"),
    ("zstd", zstd_compress(DATA)[:-1], "truncated frame"),
    ("zstd", with_byte_flipped(zstandard.ZstdCompressor(write_checksum=True).compress(DATA), -1), "zstd"),
    (
        "zstd",
        zstandard.compress(b"ab").replace(b"\x20\x02", b"\x20\x01", 1),
        "zstd",
    ),  # declares 1 byte, holds 2
    ("zstd", zstd_compress(DATA) + b"garbage!", "8 bytes of trailing data after a zstd frame"),
]


@pytest.mark.parametrize(("name", "body", "words"), CORRUPT)
def test_anything_but_whole_streams_is_corrupt(name, body, words):
    with pytest.raises(CorruptBody, match=words):
        inflate(Encoding(name), body, MIB)


def test_inflating_is_held_at_the_most_it_may_take_then_at_what_it_took():
    """A compressed body's share of the decode budget while it inflates is what inflating it may hold
    (it held its compressed size before: a few hundred bombs inflating at once were uncounted), and
    afterwards what it inflated to costs decoded."""
    from meterhouse.collector.budget import DecodeBudget
    from meterhouse.collector.receivers.compression import Encoding, inflating_cost

    limit = 20 << 20
    assert inflating_cost(Encoding.GZIP, 1 << 20, limit) == (1 << 20) + 2 * limit  # a 1 MB bomb
    assert inflating_cost(Encoding.DEFLATE, 1000, limit) == 1000 + 2 * 1000 * 1032
    assert inflating_cost(Encoding.ZSTD, 1000, limit) == 1000 + 2 * limit  # zstd: no ratio bounds it
    budget = DecodeBudget(capacity=200 << 20, wait_s=0.01)
    with budget.hold(inflating_cost(Encoding.GZIP, 1 << 20, limit)) as hold:
        with budget.hold(inflating_cost(Encoding.GZIP, 1 << 20, limit)):
            assert budget.used > 80 << 20  # a fourth would wait
        hold.resize(5 << 20)
        assert budget.used == 5 << 20
    assert budget.used == 0
