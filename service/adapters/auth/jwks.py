"""A JSON Web Key Set fetched from ``ALEX_JWT_JWKS_URL``, cached, and fetched again for an unknown ``kid``.

The set is fetched at most once per ``min_refresh_seconds`` (so that tokens with made-up ``kid`` values cannot
make the server hammer the identity provider) and again when older than ``max_age_seconds``. While the provider is
down, the keys already held keep working; a token that needs a key the server never had answers 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import structlog

from service.tokens import InvalidToken, KeyNotCached, KeysUnavailable

log = structlog.get_logger("service.auth.jwks")

_SIGNING_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
"""Shared-secret (``oct``) keys never come from a public key set."""


class JwksKeys:
    def __init__(self, url: str, http: httpx.AsyncClient, *, max_age_seconds: float = 600.0,
                 min_refresh_seconds: float = 10.0) -> None:
        self._url = url
        self._http = http
        self._max_age = max_age_seconds
        self._min_refresh = min_refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The key the token names: :class:`KeyNotCached` when the set should be fetched first (never fetched,
        unknown ``kid``, or older than ``max_age_seconds``) unless it was tried moments ago."""
        kid = header.get("kid")
        key = self._lookup(kid if isinstance(kid, str) else None)
        fresh = self._fetched_at is not None and time.monotonic() - self._fetched_at <= self._max_age
        if (key is None or not fresh) and not self._recently_attempted():
            raise KeyNotCached(kid)
        if key is None:
            if self._fetched_at is None:
                raise KeysUnavailable("the signing keys cannot be fetched right now")
            raise InvalidToken("unknown signing key")
        return key.key, [key.algorithm_name]

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without kid is fine only when the set leaves no doubt.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _recently_attempted(self) -> bool:
        return self._attempted_at is not None and time.monotonic() - self._attempted_at < self._min_refresh

    async def refresh(self, kid: str | None) -> None:
        """Fetch the set, unless that was tried moments ago (by this or a concurrent request)."""
        async with self._lock:
            if self._recently_attempted():
                return
            self._attempted_at = time.monotonic()
            try:
                response = await self._http.get(self._url, timeout=5.0)
                response.raise_for_status()
                document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("jwks_fetch_failed", error=type(exc).__name__, had_keys=len(self._keys))
                if not self._keys:
                    raise KeysUnavailable("the signing keys cannot be fetched right now") from None
                return
            self._keys = self._parse(document)
            self._fetched_at = time.monotonic()
            log.info("jwks_fetched", keys=len(self._keys), wanted_kid=kid)

    @staticmethod
    def _parse(document: Any) -> dict[str, jwt.PyJWK]:
        keys: dict[str, jwt.PyJWK] = {}
        entries = document.get("keys", []) if isinstance(document, dict) else []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("kty") not in _SIGNING_KEY_TYPES:
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
            keys[str(entry.get("kid", f"#{index}"))] = key
        return keys
