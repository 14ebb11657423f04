"""OTLP/HTTP Content-Encoding against a real `meterhouse up`: identity, gzip, deflate (zlib) and zstd bodies,
protobuf and JSON, are stored exactly; 1 GiB of zeros compressed in each encoding is refused 413 while the
process's peak RSS barely moves (it is never inflated whole); several encodings at once, or an unknown one,
is 415 naming the accepted ones. Corrupt streams are in tests/test_bad_input.py; the SDK's own gzip and
deflate in tests/test_otlp_sdk.py and tests/test_conformance.py."""

import socket
import struct
import time
import zlib

import pytest
import requests
import zstandard
from conftest import module_up
from google.protobuf import json_format
from otlp_builders import ENCODERS, point, sum_request

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
MIB = 1 << 20
LIMIT = 4 * MIB  # every bomb below compresses under it, so it is read whole and must be inflated bounded
PB = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    yield from module_up(tmp_path_factory, "encoding", "--max-request-bytes", str(LIMIT))


def request(org: str, value: int, metric: str = "enc.calls"):
    return sum_request({metric: [point(value, {"org.id": org})]})


def post(up, body: bytes, headers: dict) -> requests.Response:
    return requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=headers, timeout=120)


def total(up, org: str, metric: str = "enc.calls"):
    up.drain()
    now = int(time.time())
    return fetch_usage(up.api, org, metric, now // 3600 * 3600 - 3600, (now // 3600 + 2) * 3600, "1h")[
        "total"
    ]


def refused(up) -> dict[str, float]:
    """meterhouse_requests_total over HTTP, by outcome."""
    out = {}
    for line in requests.get(f"{up.api}/metrics", timeout=10).text.splitlines():
        if line.startswith("meterhouse_requests_total{") and 'transport="http"' in line:
            out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_every_encoding_of_protobuf_and_json_is_stored_exactly(up):
    encoders = {"identity": lambda b: b, **ENCODERS}
    for i, (name, encode) in enumerate(encoders.items()):
        org = f"org-{name}"
        pb, js = request(org, 1000 + i), request(org, 7 * i + 1)
        for body, ctype in ((pb.SerializeToString(), "application/x-protobuf"),
                            (json_format.MessageToJson(js).encode(), "application/json")):  # fmt: skip
            r = post(up, encode(body), {"Content-Type": ctype, "Content-Encoding": name})
            assert r.status_code == 200, (name, ctype, r.content[:300])
        assert total(up, org) == 1000 + i + 7 * i + 1, name
    # Codings are case-insensitive; an empty header names none.
    for header, encode in (
        ("ZSTD", ENCODERS["zstd"]),
        ("Deflate", ENCODERS["deflate"]),
        ("", encoders["identity"]),
    ):
        r = post(up, encode(request("org-header", 5).SerializeToString()), {**PB, "Content-Encoding": header})
        assert r.status_code == 200, (header, r.content[:300])
    assert total(up, "org-header") == 15


def test_several_zstd_frames_and_a_skippable_one_are_one_request(up):
    """RFC 8878 allows several frames (and skippable ones) in one stream; protobuf messages concatenate."""
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"notes"
    frames = [ENCODERS["zstd"](request("org-frames", v).SerializeToString()) for v in (3, 4)]
    r = post(up, frames[0] + skippable + frames[1], {**PB, "Content-Encoding": "zstd"})
    assert r.status_code == 200, r.content[:300]
    assert total(up, "org-frames") == 7


def zlib_bomb(wbits: int, mib: int = 1024) -> bytes:
    """``mib`` MiB of zeros as one gzip (wbits 31) or zlib (wbits 15) stream, built in a second: full
    flushes make every MiB's deflate block the same bytes, so one is repeated; the trailer is computed."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == block
    end = c.flush()
    gz = wbits > 15
    check = 0 if gz else 1
    for _ in range(mib):
        check = zlib.crc32(zeros, check) if gz else zlib.adler32(zeros, check)
    trailer = struct.pack("<II", check, mib * MIB & 0xFFFFFFFF) if gz else struct.pack(">I", check)
    return first + block * (mib - 1) + end[: -len(trailer)] + trailer


def zstd_bomb(declare_size: bool) -> bytes:
    zeros = bytes(MIB)
    c = zstandard.ZstdCompressor(write_content_size=declare_size).compressobj(
        size=1024 * MIB if declare_size else -1
    )
    return b"".join(c.compress(zeros) for _ in range(1024)) + c.flush()


BOMBS = {
    "gzip": lambda: zlib_bomb(31),
    "deflate": lambda: zlib_bomb(15),
    "zstd": lambda: zstd_bomb(declare_size=False),  # streamed: no size to refuse it by
    "zstd declaring its size": lambda: zstd_bomb(declare_size=True),
}


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields


@pytest.mark.parametrize("name", BOMBS)
def test_a_gibibyte_bomb_is_refused_413_without_being_inflated(up, name):
    bomb = BOMBS[name]()
    encoding = name.split()[0]
    assert len(bomb) < LIMIT  # read whole: only the inflating is bounded
    warm = post(
        up,
        ENCODERS[encoding](request("org-warm", 1).SerializeToString()),
        {**PB, "Content-Encoding": encoding},
    )
    assert warm.status_code == 200  # the encoding's code paths are loaded before the peak is read
    before, counts = memory_kib(up.proc.pid), refused(up)
    r = post(up, bomb, {**PB, "Content-Encoding": encoding})
    after = memory_kib(up.proc.pid)
    assert r.status_code == 413, r.content[:300]
    assert "limit" in r.content.decode(errors="replace"), r.content[:300]
    # 1 GiB inflated whole would raise the peak by 1 GiB; bounded, it is the limit and a few buffers.
    assert after["VmHWM"] - before["VmHWM"] < 40 * 1024, (before, after)
    assert refused(up)["too_large"] == counts["too_large"] + 1
    assert post(up, request("org-after-bomb", 1).SerializeToString(), PB).status_code == 200


@pytest.mark.parametrize("header", ["br", "gzip, zstd", "deflate, gzip", "identity, gzip", "snappy"])
def test_an_unknown_or_stacked_encoding_is_415_naming_the_accepted_ones(up, header):
    body = request("org-415", 1).SerializeToString()
    r = post(up, body, {**PB, "Content-Encoding": header})
    assert r.status_code == 415
    assert r.headers["Accept-Encoding"] == "gzip, deflate, zstd"
    message = r.content.decode(errors="replace")
    assert "gzip, deflate, zstd" in message, message


def test_two_content_encoding_headers_are_two_encodings(up):
    """HTTP joins repeated header fields into one list: `gzip` twice is gzip applied twice, refused."""
    body = ENCODERS["gzip"](request("org-twice", 1).SerializeToString())
    with socket.create_connection(("127.0.0.1", up.otlp_http_port), timeout=30) as s:
        s.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                  b"Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 415"), answer[:300]
    assert total(up, "org-twice") == 0
