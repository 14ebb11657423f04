"""Adversary 29b: h2 buffers a frame whole before it checks the frame's length against SETTINGS_MAX_FRAME_SIZE.

``h2.frame_buffer.FrameBuffer.__next__`` returns (waits for more) while ``len(self._data) < length + 9``
and calls ``_validate_frame_length`` only once the whole frame is in, so a frame header announcing
2^24-1 bytes (the largest the 24-bit length field holds; the server advertises the default 16 KiB) has
the server keep up to 16 MiB per connection in ``incoming_buffer._data``, charged to nothing
(``--grpc-max-bytes-in-flight`` counts DATA handed to the server; these bytes never become an event) and
never timed out (no call is open, so only the 300 s idle timeout applies; the read timeout starts with a
call). Connections are bounded at 1,310 per port and 256 per address, budgeted at 16 KiB each: 70
connections of 16 MiB are past a 1 GiB budget. Now each frame's length is checked as its header arrives
(``grpc_server.FrameLengths``) and a frame past the bound closes the connection (FRAME_SIZE_ERROR).
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from hostile_mix import MemoryCgroup, cgroup_unavailable
from prometheus_client import CollectorRegistry
from test_adv29_grpc_stall import honest_exports

from bench.slow_grpc import h2_preface, loopback_socket
from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.core.metrics import PipelineMetrics

BIG = (
    1 << 24
) - 1  # the frame length field's largest value; the advertised SETTINGS_MAX_FRAME_SIZE is 16,384


class OpenIngestor:
    def authenticate(self, header):
        return None


def hold_a_big_frame(port: int, source: str, frame_type: int = 0x0, short_by: int = 16) -> socket.socket:
    """Preface, SETTINGS, then a frame header announcing ``BIG`` bytes and all of them but ``short_by``."""
    s = loopback_socket(port, source)
    h2_preface(s)
    s.sendall(BIG.to_bytes(3, "big") + bytes([frame_type, 0]) + (1).to_bytes(4, "big"))
    chunk = b"\0" * (1 << 20)
    left = BIG - short_by
    s.settimeout(30)
    try:
        while left > 0:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server closed the connection at the frame's header (FRAME_SIZE_ERROR)
    return s


@pytest.mark.parametrize(
    "frame_type", [0x0, 0x1, 0x9, 0xFA], ids=["DATA", "HEADERS", "CONTINUATION", "unknown"]
)
def test_a_frame_longer_than_the_advertised_maximum_is_not_buffered(frame_type):
    r = OtlpGrpcReceiver("127.0.0.1", 0, OpenIngestor(), PipelineMetrics(CollectorRegistry()), 1 << 20)
    r.start()
    s = None
    try:
        s = hold_a_big_frame(r.port, "127.0.0.2", frame_type)
        time.sleep(0.5)
        held = [len(c.h2.incoming_buffer._data) for c in list(r._server.connections)]
        # One frame may be buffered up to the advertised maximum (16 KiB + its 9-byte header).
        assert max(held, default=0) <= 16_384 + 9, (
            f"the server holds {held} bytes of one unfinished frame announcing {BIG:,} bytes "
            f"(advertised SETTINGS_MAX_FRAME_SIZE 16,384)"
        )
    finally:
        if s is not None:
            s.close()
        r.shutdown(1)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_unfinished_oversized_frames_do_not_take_meterhouse_past_its_memory_budget(up_factory):
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    budget = 1 << 30
    cgroup = MemoryCgroup(budget)
    up = None
    socks: list[socket.socket] = []
    lock = threading.Lock()
    errors: list[str] = []
    try:
        up = up_factory("--memory-budget-bytes", str(budget), cgroup=cgroup.path)
        assert honest_exports(up, "org-warm", 1)[1][0].name == "SUCCESS"

        def attacker(source: str, n: int) -> None:
            for _ in range(n):
                try:
                    s = hold_a_big_frame(up.otlp_grpc_port, source)
                except OSError as e:
                    with lock:
                        errors.append(repr(e))
                    return
                with lock:
                    socks.append(s)

        # 96 connections (24 from each of four addresses, far below the 256 per address and 1,310 per
        # port): 1.5 GiB of frames that never finish.
        threads = [
            threading.Thread(target=attacker, args=(f"127.0.0.{i}", 24), daemon=True) for i in range(2, 6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(1)
        alive = up.proc.poll() is None
        sent, results, took = honest_exports(up, "org-honest", 3) if alive else (0, [], [])
        assert alive and cgroup.oom_kills() == 0, (
            f"meterhouse up {'alive' if alive else f'exited {up.proc.returncode}'}, "
            f"{cgroup.oom_kills()} OOM kills in its {budget >> 20} MiB cgroup (peak "
            f"{cgroup.peak_bytes() >> 20} MiB) after {len(socks)} connections each holding an unfinished "
            f"frame of {BIG - 16:,} bytes; attacker errors {errors[:3]}; honest exports "
            f"{[r.name for r in results]}"
        )
        assert [r.name for r in results] == ["SUCCESS"] * 3, (results, took)
    finally:
        for s in socks:
            s.close()
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()
