"""JWTs: minting and verifying, every way a token is refused, and the generated secret."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from service.app.access import Principal
from service.config import load_settings
from service.tokens import (
    LEEWAY_SECONDS,
    InvalidToken,
    KeyNotCached,
    TokenVerifier,
    load_or_create_secret,
    mint_token,
    parse_scopes,
    signing_key,
)
from tests.unit.fakes import clear_settings_environment

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
OTHER_SECRET = "another-test-secret-long-enough-for-hs256"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "exp": now + 300, "iat": now, "scope": "tasks:write sessions:read"}
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def encode(body: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(body, secret, algorithm=algorithm)


def refused(token: str, verifier: TokenVerifier | None = None) -> str:
    with pytest.raises(InvalidToken) as caught:
        (verifier or TokenVerifier(SECRET)).verify(token)
    assert SECRET not in str(caught.value)
    return caught.value.reason


def test_a_minted_token_verifies_with_its_scopes() -> None:
    token = mint_token(SECRET, "alice", ["tasks:write", "sessions:read"], ttl_seconds=60)
    assert TokenVerifier(SECRET).verify(token) == Principal("alice", frozenset({"tasks:write", "sessions:read"}))


def test_a_minted_token_has_the_claims_the_contract_names() -> None:
    token = mint_token(SECRET, "alice", ["admin"], ttl_seconds=60, issuer="alex", audience="alex-api")
    body = jwt.decode(token, SECRET, algorithms=["HS256"], audience="alex-api")
    assert body["sub"] == "alice"
    assert body["scope"] == "admin"
    assert body["iss"] == "alex"
    assert 55 <= body["exp"] - body["iat"] <= 60


def test_scopes_may_come_as_a_list() -> None:
    token = encode(claims(scope=None, scopes=["sessions:read", "admin"]))
    principal = TokenVerifier(SECRET).verify(token)
    assert principal.scopes == {"sessions:read", "admin"}
    assert principal.is_admin


def test_scope_and_scopes_together_are_joined() -> None:
    token = encode(claims(scope="tasks:write", scopes=["sessions:read"]))
    assert TokenVerifier(SECRET).verify(token).scopes == {"tasks:write", "sessions:read"}


def test_no_scope_claim_means_no_scopes() -> None:
    assert TokenVerifier(SECRET).verify(encode(claims(scope=None))).scopes == frozenset()


def test_parse_scopes_ignores_what_is_not_a_string() -> None:
    assert parse_scopes({"scope": 3, "scopes": ["a", 4, None, "b"]}) == {"a", "b"}
    assert parse_scopes({"scopes": "a b"}) == frozenset()


def test_an_expired_token_is_refused() -> None:
    now = int(time.time())
    assert refused(encode(claims(exp=now - LEEWAY_SECONDS - 60, iat=now - 600))) == "token expired"


def test_a_token_just_expired_is_within_the_leeway() -> None:
    token = encode(claims(exp=int(time.time()) - 5))
    assert TokenVerifier(SECRET).verify(token).subject == "alice"


def test_a_token_not_yet_valid_is_refused() -> None:
    assert refused(encode(claims(nbf=int(time.time()) + 600))) == "token not yet valid"


def test_a_token_signed_with_another_secret_is_refused() -> None:
    assert refused(encode(claims(), secret=OTHER_SECRET)) == "bad signature"


def test_a_tampered_token_is_refused() -> None:
    header, _, signature = encode(claims()).split(".")
    forged_payload = jwt.utils.base64url_encode(b'{"sub":"admin","exp":9999999999,"scope":"admin"}').decode()
    assert refused(f"{header}.{forged_payload}.{signature}") == "bad signature"


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(scope="admin"), key="", algorithm="none")
    assert refused(token) == "algorithm not allowed"


def test_another_hmac_algorithm_is_refused() -> None:
    secret = "k" * 64  # HS512 wants 64 bytes; the verifier must refuse it for its algorithm, not its key
    assert refused(encode(claims(), secret, algorithm="HS512"), TokenVerifier(secret)) == "algorithm not allowed"


@pytest.mark.parametrize("claim", ["sub", "exp"])
def test_a_token_without_a_required_claim_is_refused(claim: str) -> None:
    assert refused(encode(claims(**{claim: None}))) == f"missing claim {claim}"


def test_an_empty_subject_is_refused() -> None:
    assert refused(encode(claims(sub=""))) == "missing claim sub"


@pytest.mark.parametrize("token", ["", "not-a-token", "a.b.c", "e30.e30."])
def test_garbage_is_refused(token: str) -> None:
    assert refused(token) in {"malformed token", "algorithm not allowed"}


def test_the_issuer_is_checked_when_configured() -> None:
    verifier = TokenVerifier(SECRET, issuer="alex")
    assert verifier.verify(encode(claims(iss="alex"))).subject == "alice"
    assert refused(encode(claims(iss="mallory")), verifier) == "wrong issuer"
    assert refused(encode(claims()), verifier) == "missing claim iss"


def test_the_issuer_is_not_checked_when_not_configured() -> None:
    assert TokenVerifier(SECRET).verify(encode(claims(iss="anyone"))).subject == "alice"


def test_the_audience_is_checked_when_configured() -> None:
    verifier = TokenVerifier(SECRET, audience="alex-api")
    assert verifier.verify(encode(claims(aud="alex-api"))).subject == "alice"
    assert verifier.verify(encode(claims(aud=["other", "alex-api"]))).subject == "alice"
    assert refused(encode(claims(aud="other-api")), verifier) == "wrong audience"
    assert refused(encode(claims()), verifier) == "missing claim aud"


def test_the_audience_is_not_checked_when_not_configured() -> None:
    assert TokenVerifier(SECRET).verify(encode(claims(aud="whatever"))).subject == "alice"


def test_mint_and_verify_with_issuer_and_audience() -> None:
    token = mint_token(SECRET, "bob", ["admin"], 60, issuer="alex", audience="alex-api")
    principal = TokenVerifier(SECRET, issuer="alex", audience="alex-api").verify(token)
    assert principal == Principal("bob", frozenset({"admin"}))


# The generated secret ----------------------------------------------------------------------------------------------


def test_the_secret_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "jwt_secret"

    first = load_or_create_secret(path)
    second = load_or_create_secret(path)

    assert first == second
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first


def test_two_installs_get_different_secrets(tmp_path: Path) -> None:
    assert load_or_create_secret(tmp_path / "a") != load_or_create_secret(tmp_path / "b")


def test_an_existing_secret_file_is_used(tmp_path: Path) -> None:
    path = tmp_path / "jwt_secret"
    path.write_text(SECRET + "\n")
    assert load_or_create_secret(path) == SECRET


def test_an_empty_secret_file_is_refused_not_used_as_the_key(tmp_path: Path) -> None:
    path = tmp_path / "jwt_secret"
    path.write_text(" \n")
    with pytest.raises(ValueError, match="empty") as caught:
        load_or_create_secret(path)
    assert str(path) in str(caught.value)


def test_making_the_secret_leaves_no_other_file(tmp_path: Path) -> None:
    load_or_create_secret(tmp_path / "jwt_secret")
    assert [p.name for p in tmp_path.iterdir()] == ["jwt_secret"]


def test_signing_key_prefers_the_configured_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_settings_environment(monkeypatch)
    key = signing_key(load_settings(jwt_secret=SECRET, data_dir=tmp_path))
    assert (key.secret, key.generated) == (SECRET, False)
    assert not (tmp_path / "jwt_secret").exists()


def test_signing_key_generates_one_in_the_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_settings_environment(monkeypatch)
    settings = load_settings(data_dir=tmp_path)
    key = signing_key(settings)
    assert key.generated
    assert settings.generated_secret_path.read_text().strip() == key.secret
    assert signing_key(settings) == key
    token = mint_token(key.secret, "carol", ["sessions:read"], 60)
    assert TokenVerifier(key.secret).verify(token).subject == "carol"


# --- remembered tokens: a token seen again is accepted only while a full verification would accept it ----------


class SwappableKey:
    """A key source whose key (and algorithms) the test changes, as a rotated key set would."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.algorithms = ["HS256"]
        self.unknown = False

    def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        if self.unknown:
            raise KeyNotCached(header.get("kid"))
        return self.secret, self.algorithms

    async def refresh(self, kid: str | None) -> None:
        return None


def test_a_token_seen_again_is_accepted_again_and_remembered_once() -> None:
    verifier = TokenVerifier(SECRET)
    token = encode(claims())
    assert verifier.verify(token) == verifier.verify(token) == Principal(
        "alice", frozenset({"tasks:write", "sessions:read"}))
    assert verifier.remembered == 1


def test_a_refused_token_is_not_remembered() -> None:
    verifier = TokenVerifier(SECRET)
    assert refused(encode(claims(), OTHER_SECRET), verifier) == "bad signature"
    assert refused(encode(claims(exp=int(time.time()) - 600)), verifier) == "token expired"
    assert verifier.remembered == 0


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    verifier = TokenVerifier(SECRET, leeway=0)
    expires = int(time.time()) + 1
    token = encode(claims(exp=expires))
    verifier.verify(token)
    assert verifier.remembered == 1
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    assert refused(token, verifier) == "token expired"
    assert verifier.remembered == 0


def remembered_token() -> tuple[SwappableKey, TokenVerifier, str]:
    """A verifier on swappable keys that has verified (and so remembers) one token."""
    keys = SwappableKey(SECRET)
    verifier = TokenVerifier(keys)
    token = encode(claims())
    verifier.verify(token)
    return keys, verifier, token


def test_a_remembered_token_is_refused_when_the_key_changes() -> None:
    keys, verifier, token = remembered_token()
    keys.secret = OTHER_SECRET
    assert refused(token, verifier) == "bad signature"
    keys.secret = SECRET  # back to the key that signed it: verified afresh, accepted
    assert verifier.verify(token).subject == "alice"


def test_a_remembered_token_is_refused_when_its_algorithm_is_no_longer_allowed() -> None:
    keys, verifier, token = remembered_token()
    keys.algorithms = ["HS512"]
    assert refused(token, verifier) == "algorithm not allowed"


def test_a_remembered_token_whose_key_must_be_fetched_again_says_so() -> None:
    keys, verifier, token = remembered_token()
    keys.unknown = True
    with pytest.raises(KeyNotCached):
        verifier.verify(token)


def test_a_remembered_token_is_checked_against_the_verifiers_issuer_and_audience_of_its_first_check() -> None:
    token = encode(claims(iss="alex", aud="alex-api"))
    assert TokenVerifier(SECRET, issuer="alex", audience="alex-api").verify(token).subject == "alice"
    # Another verifier (another configuration) remembers nothing of the first.
    assert refused(token, TokenVerifier(SECRET, issuer="other", audience="alex-api")) == "wrong issuer"


def test_only_the_most_recently_used_tokens_are_remembered() -> None:
    verifier = TokenVerifier(SECRET, remember=2)
    tokens = [encode(claims(sub=f"user-{n}")) for n in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert verifier.remembered == 2
    assert [verifier.verify(token).subject for token in tokens] == ["user-0", "user-1", "user-2"]
    assert verifier.remembered == 2
