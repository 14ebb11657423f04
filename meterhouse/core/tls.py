"""TLS for the three listeners: one certificate (and optional client CA) read from files, reloadable.

Reloading swaps the material new connections are served with; connections already open keep theirs,
so SIGHUP drops nothing. A client CA makes a client certificate signed by it required (mutual TLS).
"""

from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from meterhouse.core.config import Config, ConfigError


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one generation of TLS files, and the context built from them."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext
    cert_file: str
    key_file: str
    generation: int = 0
    #: The same, offering HTTP/2 by ALPN (gRPC clients require it; the HTTP ports speak HTTP/1.1 only).
    h2_context: ssl.SSLContext | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(path: str, key: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{key}: {path} is not a PEM file")
    return data


def load_material(config: Config, generation: int = 0) -> TlsMaterial | None:
    """Read and check the configured files (None without TLS); a bad file raises naming its key."""
    if not config.tls_enabled:
        return None
    cert = _read(config.tls_cert_file, "tls.cert_file")
    _check_validity(cert, config.tls_cert_file)
    key = _read(config.tls_key_file, "tls.key_file")
    ca = _read(config.tls_client_ca_file, "tls.client_ca_file") if config.tls_client_ca_file else None
    ctx = _context(config.tls_cert_file, config.tls_key_file, ca)
    h2_ctx = _context(config.tls_cert_file, config.tls_key_file, ca, h2=True)
    return TlsMaterial(cert, key, ca, ctx, config.tls_cert_file, config.tls_key_file, generation, h2_ctx)


def _check_validity(chain: bytes, path: str) -> None:
    """The served (first) certificate is within its validity: served otherwise, it fails every new
    client's handshake, so a reload keeps the old one instead."""
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError as e:
        raise ConfigError(f"tls.cert_file: {path} holds no readable certificate: {e}") from None
    now = datetime.datetime.now(datetime.UTC)
    if now >= leaf.not_valid_after_utc:
        raise ConfigError(
            f"tls.cert_file: {path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if now < leaf.not_valid_before_utc:
        raise ConfigError(
            f"tls.cert_file: {path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )


def _context(cert_file: str, key_file: str, client_ca: bytes | None, h2: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if h2:
        ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls.cert_file / tls.key_file: cannot load the pair: {e}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"tls.client_ca_file: cannot load it: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServerTls:
    """The current TLS material of a process; :meth:`reload` swaps it atomically for new connections."""

    def __init__(self, material: TlsMaterial) -> None:
        self._material = material
        self._lock = threading.Lock()

    @property
    def material(self) -> TlsMaterial:
        return self._material

    @property
    def context(self) -> ssl.SSLContext:
        return self._material.context

    def reload(self, config: Config) -> TlsMaterial:
        """Read the files again; on a bad file the old material stays and ConfigError is raised."""
        with self._lock:
            new = load_material(config, self._material.generation + 1)
            if new is None:
                raise ConfigError("tls: cannot be turned off by a reload; restart without it")
            if new.mutual != self._material.mutual:
                raise ConfigError("tls.client_ca_file: turning mutual TLS on or off needs a restart")
            self._material = new
            return new

    def front_context(self, h2: bool = False) -> ssl.SSLContext:
        """The context to give a server that builds its listener once (uvicorn, asyncio); ``h2``: one
        that offers HTTP/2 by ALPN (the gRPC port).

        Each handshake is moved, from the ClientHello callback (which OpenSSL runs with or without
        SNI), to the context of the material current at that moment; whether a client certificate is
        required is this front context's, fixed at start.
        """
        m = self._material
        front = _context(m.cert_file, m.key_file, m.client_ca, h2)
        front.sni_callback = self._switch_h2 if h2 else self._switch
        return front

    def _switch(self, sslobj: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._material.context

    def _switch_h2(self, sslobj: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        m = self._material
        sslobj.context = m.h2_context or m.context
