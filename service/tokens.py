"""JWTs: verifying the callers' tokens and minting tokens for the configured key.

Keys, one of: ``ALEX_JWT_SECRET`` (HS256); ``ALEX_JWT_PUBLIC_KEY`` or ``ALEX_JWT_PUBLIC_KEY_FILE`` (a PEM public key:
RSA for RS256/RS384/RS512/PS256…, EC for ES256/ES384/ES512, Ed25519 for EdDSA); ``ALEX_JWT_JWKS_URL`` (a key set,
see ``service.adapters.auth.jwks``). With none configured, the server makes a random secret once and keeps it in its
data folder (mode 0600), so that a fresh install is secure and ``alex-server token`` works at once.

Each key source fixes the algorithms it accepts, so ``alg: none`` and algorithm confusion (an HS256 token signed
with a public key's bytes) are refused before any signature is checked.

A client sends the same token with every request until it expires, so the verifier remembers the tokens it
accepted (:data:`VERIFIED_TOKENS`, the most recently used): a token seen again skips the signature and the claims'
parsing, but its times are checked again as they were the first time (``exp``, ``nbf`` and ``iat`` against the
clock, with the leeway), and the key its source gives for it now must be the very key that verified it, else the
token is verified afresh (a rotated key set, a refreshed JWKS). Only accepted tokens are kept; a refused one is
checked in full every time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from service.app.access import Principal
from service.config import Settings

ALGORITHM = "HS256"
LEEWAY_SECONDS = 30
VERIFIED_TOKENS = 4096
"""How many accepted tokens a verifier remembers (a few hundred bytes each)."""


class InvalidToken(Exception):
    """The token is not acceptable. ``reason`` is short, bounded and safe to show (it holds no secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyNotCached(Exception):
    """The token names a key (``kid``) the verifier does not hold yet: refresh the key set, then verify again."""


class KeysUnavailable(Exception):
    """The key set cannot be had right now (its server does not answer): the token can be neither accepted nor
    refused, so the caller answers 503, never 401 and never 500."""


class KeySource(Protocol):
    """Where the verification key for a token comes from, with the algorithms it may be used with."""

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The key and its allowed algorithms for a token with this header; may raise :class:`KeyNotCached`
        or :class:`InvalidToken`."""

    async def refresh(self, kid: str | None) -> None:
        """Fetch the key set again (when the source has one); may raise :class:`KeysUnavailable`."""


class SharedSecret:
    def __init__(self, secret: str) -> None:
        self._secret = secret

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        return self._secret, [ALGORITHM]

    async def refresh(self, kid: str | None) -> None:
        return None


def algorithms_for(key: Any) -> list[str]:
    """The signature algorithms a public key may verify, by its type: never an HMAC one."""
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": ["ES256"], "secp384r1": ["ES384"], "secp521r1": ["ES512"]}.get(key.curve.name, [])
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    return []


class PublicKey:
    """A PEM public key (``ALEX_JWT_PUBLIC_KEY`` or ``_FILE``)."""

    def __init__(self, pem: str) -> None:
        try:
            self._key = load_pem_public_key(pem.encode())
        except ValueError:
            raise ValueError("not a PEM public key") from None
        self._algorithms = algorithms_for(self._key)
        if not self._algorithms:
            raise ValueError("the key type is not supported (use RSA, EC P-256/384/521 or Ed25519)")

    @property
    def algorithms(self) -> list[str]:
        return list(self._algorithms)

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        return self._key, self._algorithms

    async def refresh(self, kid: str | None) -> None:
        return None


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


@dataclass(frozen=True, slots=True)
class _Accepted:
    """What a full verification of a token found, enough to accept it again without one."""

    principal: Principal
    header: dict[str, Any]
    key: Any
    algorithm: str
    expires: int
    not_before: int | None
    """The later of ``nbf`` and ``iat``, when the token has either."""


class TokenVerifier:
    """Checks a token's signature and claims (``sub`` and ``exp`` required; ``nbf``/``iat`` with a leeway;
    ``iss``/``aud`` when configured) and returns who it names. Accepted tokens are remembered (see the module's
    docstring)."""

    def __init__(self, keys: str | KeySource, *, issuer: str | None = None, audience: str | None = None,
                 leeway: float = LEEWAY_SECONDS, remember: int = VERIFIED_TOKENS) -> None:
        self._keys: KeySource = SharedSecret(keys) if isinstance(keys, str) else keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._remember = remember
        self._accepted: OrderedDict[str, _Accepted] = OrderedDict()

    @property
    def remembered(self) -> int:
        """How many accepted tokens are remembered now."""
        return len(self._accepted)

    async def refresh_keys(self, token: str) -> None:
        """Fetch the key set again for a token whose key is unknown; :class:`KeysUnavailable` when it can't."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        await self._keys.refresh(kid if isinstance(kid, str) else None)

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; :class:`InvalidToken`, or :class:`KeyNotCached` for an unknown key."""
        accepted = self._accepted.get(token)
        if accepted is not None:
            if self._still_valid(accepted):
                self._accepted.move_to_end(token)
                return accepted.principal
            del self._accepted[token]
        accepted = self._verify(token)
        if self._remember > 0:
            self._accepted[token] = accepted
            if len(self._accepted) > self._remember:
                self._accepted.popitem(last=False)
        return accepted.principal

    def _still_valid(self, accepted: _Accepted) -> bool:
        """Whether a remembered token passes now what it passed then; raises what the key source raises for it
        (an unknown key, a key set to fetch again), exactly as a full verification would."""
        key, algorithms = self._keys.key_for(accepted.header)
        if key is not accepted.key or accepted.algorithm not in algorithms:
            return False
        now = time.time()
        if accepted.expires <= now - self._leeway:
            return False
        return accepted.not_before is None or accepted.not_before <= now + self._leeway

    def _verify(self, token: str) -> _Accepted:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        key, algorithms = self._keys.key_for(header)
        algorithm = header.get("alg")
        if algorithm not in algorithms:
            raise InvalidToken("algorithm not allowed")
        options: jwt.types.Options = {"require": ["sub", "exp"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
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
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("missing claim sub")
        # jwt.decode checked that these are integers (or convert to one), as it compares them the same way.
        starts = [int(claims[name]) for name in ("nbf", "iat") if name in claims]
        return _Accepted(Principal(subject, parse_scopes(claims)), header, key, str(algorithm), int(claims["exp"]),
                         max(starts) if starts else None)


def mint_token(secret: str, subject: str, scopes: Iterable[str], ttl_seconds: int,
               *, issuer: str | None = None, audience: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "scope": " ".join(scopes), "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
