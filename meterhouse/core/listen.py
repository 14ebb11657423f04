"""The listening ports of `meterhouse up`: bound before anything else starts, a failure said in one line.

Every port is bound before the store, the spool or any thread is started (the API's first, OTLP/gRPC's
last: gRPC gives a bound port back only by stopping a started server, so nothing is bound after it), so a
port another process holds (a local OpenTelemetry Collector on 4317, say), a port the user may not bind
or an address that is not this host's stops the start at once with :class:`ListenError`: one line naming
the listener, its address and the options that set them, and nothing to undo.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meterhouse.core.config import option_names_of


@dataclass(frozen=True)
class Listener:
    """One listening port: what it serves and the option that sets its port."""

    name: str
    port_option: str


OTLP_GRPC = Listener("OTLP/gRPC", "otlp_grpc_port")
OTLP_HTTP = Listener("OTLP/HTTP", "otlp_http_port")
API = Listener("the API and /metrics (HTTP)", "http_port")
SQL = Listener("the SQL endpoint (ClickHouse HTTP)", "sql_port")


class ListenError(Exception):
    """A listener cannot be bound; the message says which, where, why, and which options to change."""

    def __init__(self, listener: Listener, host: str, port: int, cause: OSError) -> None:
        self.listener, self.host, self.port, self.cause = listener, host, port, cause
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = (cause.strerror or str(cause)).rstrip(".")
        port_option, host_option = option_names_of(listener.port_option), option_names_of("host")
        if cause.errno == errno.EADDRINUSE:
            advice = f"another process holds that port: stop it, or set {port_option} to a free port"
        elif cause.errno == errno.EACCES:
            advice = f"ports below 1024 need privileges: set {port_option} to a port above 1023"
        elif cause.errno == errno.EADDRNOTAVAIL or isinstance(cause, socket.gaierror):
            advice = f"the address is not one of this host's (or does not resolve): set {host_option}"
        else:
            advice = f"the address is set by {host_option}, the port by {port_option}"
        super().__init__(f"cannot listen for {listener.name} on {address}: {reason}; {advice}")


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A socket listening on ``host:port`` (``SO_REUSEADDR``, as gRPC's own listeners have); OSError when
    it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def listening(listener: Listener, host: str, port: int) -> Iterator[None]:
    """Binding ``listener`` inside: an OSError becomes :class:`ListenError`."""
    try:
        yield
    except OSError as e:
        raise ListenError(listener, host, port, e) from None
