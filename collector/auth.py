"""Ingest tokens: who may send usage, and for which orgs.

Every presented token is compared, in constant time, with every configured one (SHA-256 digests of
equal length, so neither the position nor the length of a match leaks). :meth:`IngestTokens.replace`
swaps the whole set at once, so a reload never serves a half-updated list. Tokens are never logged;
a principal is known by a short digest of its token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from meterhouse.core.config import Token


class Unauthenticated(Exception):
    """No token, or an unknown one: answer 401 / UNAUTHENTICATED and keep nothing."""


@dataclass(frozen=True)
class Principal:
    """An authenticated sender: its token's org scope, and an id that is safe to log and persist."""

    token: Token
    id: str

    def allows(self, org: str) -> bool:
        return self.token.allows(org)

    @property
    def all_orgs(self) -> bool:
        return self.token.all_orgs


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class IngestTokens:
    """The configured ingest tokens; empty = ingest is open (no authentication)."""

    def __init__(self, tokens: tuple[Token, ...] = ()) -> None:
        self._entries: tuple[tuple[bytes, Principal], ...] = ()
        self.replace(tokens)

    def replace(self, tokens: tuple[Token, ...]) -> None:
        """Atomically serve a new set of tokens (one reference assignment)."""
        entries = []
        for t in tokens:
            d = _digest(t.token)
            entries.append((d, Principal(t, d[:6].hex())))
        self._entries = tuple(entries)

    @property
    def principals(self) -> tuple[Principal, ...]:
        return tuple(p for _, p in self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, header: str | Sequence[str] | None) -> Principal | None:
        """The sender of ``Authorization: Bearer <token>``; None when ingest is open.

        ``header`` may be every value of the header a request carries: more than one is refused, since
        which one counts would be a guess (and proxies and servers guess differently).
        """
        entries = self._entries  # one snapshot for the whole look-up
        if not entries:
            return None
        if header is not None and not isinstance(header, str):
            if len(header) > 1:
                raise Unauthenticated("more than one Authorization header; send exactly one")
            header = header[0] if header else None
        scheme, _, presented = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("an ingest token is required (Authorization: Bearer <token>)")
        d = _digest(presented.strip())
        found = None
        for known, principal in entries:  # every entry, whatever matches
            if hmac.compare_digest(known, d):
                found = principal
        if found is None:
            raise Unauthenticated("unknown ingest token")
        return found
