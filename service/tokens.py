"""JWTs: verifying the callers' tokens and minting tokens for the configured key.

Keys: ``ALEX_JWT_SECRET`` (HS256), or, with none configured, a random secret the server makes once and keeps in
its data folder (mode 0600), so that a fresh install is secure and ``alex-server token`` works at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from service.app.access import Principal
from service.config import Settings

ALGORITHM = "HS256"
LEEWAY_SECONDS = 30


class InvalidToken(Exception):
    """The token is not acceptable. ``reason`` is short, bounded and safe to show (it holds no secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_or_create_secret(path: Path) -> str:
    """The generated secret at ``path``, made (random, 256 bits, mode 0600) on first use.

    The file appears whole or not at all (written aside, then hard-linked into place), so two processes starting
    together end up with the same secret and neither ever reads a half-written one.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race: use its secret
            os.link(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty; delete it to have a new secret made (tokens signed before stop working)")
    return secret


@dataclass(frozen=True, slots=True)
class SigningKey:
    secret: str
    generated: bool


def signing_key(settings: Settings) -> SigningKey:
    if settings.jwt_secret is not None:
        return SigningKey(settings.jwt_secret.get_secret_value(), generated=False)
    return SigningKey(load_or_create_secret(settings.generated_secret_path), generated=True)


def parse_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """``scope`` (space-separated string) and ``scopes`` (list) together."""
    found: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        found.update(scope.split())
    scopes = claims.get("scopes")
    if isinstance(scopes, list):
        found.update(s for s in scopes if isinstance(s, str))
    return frozenset(found)


class TokenVerifier:
    def __init__(self, secret: str, *, issuer: str | None = None, audience: str | None = None,
                 leeway: float = LEEWAY_SECONDS) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway

    def verify(self, token: str) -> Principal:
        options: jwt.types.Options = {"require": ["sub", "exp"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"missing claim {exc.claim}") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("missing claim sub")
        return Principal(subject, parse_scopes(claims))


def mint_token(secret: str, subject: str, scopes: Iterable[str], ttl_seconds: int,
               *, issuer: str | None = None, audience: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "scope": " ".join(scopes), "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
