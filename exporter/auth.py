"""Bearer-token auth for the API: each token is scoped to a list of org ids, or ``*`` for all."""

from __future__ import annotations

import hashlib
import hmac

from meterhouse.core.config import Token


class Unauthorized(Exception):
    pass


class Auth:
    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self.tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def authenticate(self, header: str | None) -> Token | None:
        """The token's scope; None when auth is off. Raises :class:`Unauthorized` otherwise."""
        if not self.tokens:
            return None
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        found = None
        # SHA-256 digests (equal length whatever the input), compared with every token whatever matches:
        # hmac.compare_digest returns at once on values of different lengths.
        digest = _digest(presented.strip())
        for t in self.tokens:
            if hmac.compare_digest(_digest(t.token), digest):
                found = t
        if found is None:
            raise Unauthorized("invalid token")
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
