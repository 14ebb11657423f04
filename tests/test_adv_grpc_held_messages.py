"""OTLP/gRPC messages that are sent all but their last byte, on many streams at once, against a real
`meterhouse up` inside a memory cgroup limited to its budget. Each message's bytes are counted in
``--grpc-max-bytes-in-flight`` as they arrive, so a call whose bytes do not fit is answered UNAVAILABLE
(what it held given back) and what is held stays within it. (grpcio's server held what had arrived
of every message, up to ``--max-request-bytes`` a call, outside every bound of meterhouse's.)"""

from __future__ import annotations

import select
import signal
import socket
import time

import h2.config
import h2.connection
import h2.events
import pytest
import requests
from hostile_mix import EXPORT, PROTOBUF, AnonPeak, MemoryCgroup, cgroup_unavailable
from otlp_builders import point, sum_request

BUDGET = 1 << 30  # the default --memory-budget-bytes


def hold_messages(target: str, streams: int, size: int, seconds: float, source: str) -> int:
    """Open ``streams`` calls on one HTTP/2 connection from ``source`` and send each a message of ``size``
    bytes but its last byte, as fast as flow control lets; keep them open for ``seconds``. Returns the
    bytes sent."""
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), source_address=(source, 0))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    sock.sendall(conn.data_to_send())
    headers = [(":method", "POST"), (":scheme", "http"), (":path", EXPORT), (":authority", target),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    left: dict[int, int] = {}
    for _ in range(streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        left[sid] = (
            5 + size - 1
        )  # gRPC's prefix (an uncompressed message of ``size`` bytes), then the message
    sock.sendall(conn.data_to_send())
    prefix, chunk = b"\0" + size.to_bytes(4, "big"), b"\x0a" * 16384
    first = set(left)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            progressed = False
            for sid in left:
                if left[sid] == 0:
                    continue
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, left[sid])
                while window > 0:
                    data = (prefix + chunk)[:window] if sid in first else chunk[:window]
                    first.discard(sid)
                    conn.send_data(sid, data)
                    left[sid] -= len(data)
                    sent += len(data)
                    progressed = True
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, left[sid])
            if out := conn.data_to_send():
                sock.sendall(out)
            if select.select([sock], [], [], 0 if progressed else 0.01)[0]:
                data = sock.recv(1 << 20)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
                        left[event.stream_id] = 0
                if out := conn.data_to_send():
                    sock.sendall(out)
    except OSError:  # the server closed the connection (or died)
        pass
    finally:
        sock.close()
    return sent


@pytest.mark.soak
@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_grpc_messages_held_short_of_their_last_byte_keep_the_process_in_its_budget(up_factory):
    """One connection from one address, 60 calls (under the 64 an address may hold), each a message of
    19.9 MB sent but its last byte, 1.2 GB in all, past the 1 GiB budget. grpcio's server held them all
    (OOM-killed in its cgroup in 5 s, after 995 MiB sent); now only what the byte budget takes is
    held."""
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    cgroup = MemoryCgroup(BUDGET)
    up = None
    try:
        up = up_factory("--memory-budget-bytes", str(BUDGET), cgroup=cgroup.path)
        anon = AnonPeak(up.proc.pid)
        sent = hold_messages(up.otlp_grpc, streams=60, size=19_900_000, seconds=20, source="127.0.0.3")
        time.sleep(1)
        peak, died = anon.stop(), up.proc.poll()
        assert died is None and cgroup.oom_kills() == 0, (
            f"meterhouse up died ({cgroup.oom_kills()} OOM kills, exit {died}) after {sent >> 20} MiB of "
            f"unfinished messages; peak anonymous memory {peak >> 20} MiB"
        )
        assert peak <= BUDGET, f"peak anonymous memory {peak >> 20} MiB ({sent >> 20} MiB sent)"
        honest = sum_request({"honest.calls": [point(1, {"org.id": "org-honest"})]}).SerializeToString()
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=honest, headers=PROTOBUF, timeout=60)
        assert r.status_code == 200, (r.status_code, r.content[:300])
    finally:
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()
