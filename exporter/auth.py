"""Bearer-token auth for the API: each token is scoped to a list of org ids, or ``*`` for all."""

from __future__ import annotations

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
        for t in self.tokens:  # compare with every token, in constant time, whatever matches
            if hmac.compare_digest(t.token.encode(), presented.strip().encode()):
                found = t
        if found is None:
            raise Unauthorized("invalid token")
        return found
