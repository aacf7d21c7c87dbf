"""Authentication and authorization over real HTTP: every /api route against every kind of bad token, scopes,
admin, the three places a token may come from (header, cookie, query), PEM keys (RS256, ES256) with algorithm
confusion, a JWKS key set (rotation, unknown kids, outage), and ``alex-server token``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from tests.integration.server import SECRET, ServerProcess, clean_environment, data_folder, free_port

pytestmark = pytest.mark.integration

ALEX_SERVER = Path(sys.executable).with_name("alex-server")
ISSUER = "https://id.example.test/"
AUDIENCE = "alex-server-tests"
LEEWAY = 30
ALL = ("tasks:write", "sessions:read", "sessions:write")
OTHER_SECRET = "another-secret-of-the-same-length-0123456789"
POLL = 0.1


# Servers and keys


@contextlib.contextmanager
def running(env: Mapping[str, str] | None = None, *, without: tuple[str, ...] = ()) -> Iterator[ServerProcess]:
    with data_folder() as folder:
        process = ServerProcess(folder, env=env)
        for name in without:
            process.env.pop(name, None)
        process.start()
        try:
            yield process
        finally:
            process.kill()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """A token with the given header and no signature at all, as an attacker writes one by hand."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def hmac_signed(claims: Mapping[str, Any], key: bytes, kid: str | None = None) -> str:
    """An HS256 token signed with arbitrary bytes (PyJWT refuses a PEM key as an HMAC secret, an attacker won't)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(sub: str | None = "alice", scopes: tuple[str, ...] = ALL, *, ttl: int = 600, issuer: bool = True,
           **extra: Any) -> dict[str, Any]:
    """Claims for the HS256 server (which checks iss and aud); ``extra`` overrides, ``None`` removes a claim."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "scope": " ".join(scopes), "iat": now, "exp": now + ttl}
    if issuer:
        body |= {"iss": ISSUER, "aud": AUDIENCE}
    body |= extra
    return {name: value for name, value in body.items() if value is not None}


def hs(sub: str | None = "alice", scopes: tuple[str, ...] = ALL, **extra: Any) -> str:
    return jwt.encode(claims(sub, scopes, **extra), SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# Routes


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    scope: str
    body: dict[str, Any] | None = None

    def url(self, session_id: str = "auth-matrix", task_id: str = "t_0123456789abcdef") -> str:
        return self.path.format(session_id=session_id, task_id=task_id)

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = (
    Route("POST", "/api/tasks", "tasks:write", {"task": "say hello", "session_id": "{session_id}"}),
    Route("GET", "/api/tasks/{task_id}", "sessions:read"),
    Route("POST", "/api/tasks/{task_id}/cancel", "tasks:write"),
    Route("GET", "/api/sessions", "sessions:read"),
    Route("GET", "/api/sessions/{session_id}", "sessions:read"),
    Route("GET", "/api/sessions/{session_id}/events", "sessions:read"),
    Route("DELETE", "/api/sessions/{session_id}", "sessions:write"),
    Route("GET", "/api/sse?session_id={session_id}", "sessions:read"),
)


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    text: str
    first_event: dict[str, Any] | None = None

    def json(self) -> Any:
        return json.loads(self.text)


def call(client: httpx.Client, route: Route, headers: Mapping[str, str] | None = None,
         session_id: str = "auth-matrix", task_id: str = "t_0123456789abcdef") -> Answer:
    """One request; an event stream is read up to its ``connected`` event and closed, never left hanging."""
    body = None
    if route.body is not None:
        body = {k: (v.format(session_id=session_id) if isinstance(v, str) else v) for k, v in route.body.items()}
    with client.stream(route.method, route.url(session_id, task_id), json=body, headers=dict(headers or {}),
                       timeout=httpx.Timeout(10.0)) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return Answer(response.status_code, response.headers, "", first_sse_event(response))
        return Answer(response.status_code, response.headers, response.read().decode())


def first_sse_event(response: httpx.Response) -> dict[str, Any]:
    event = ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            return {"event": event, "data": json.loads(line.partition(":")[2])}
    raise AssertionError("the stream ended before its first event")


def check_problem(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    return body


def check_unauthorized(answer: Answer, reason: str, token: str | None, error: str = "invalid_token") -> None:
    """401 problem+json naming ``reason``, with a Bearer challenge, and never echoing the token or the secret."""
    body = check_problem(answer, 401)
    assert reason in body["detail"]
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    if token is not None:
        assert f'error="{error}"' in challenge
    everything = answer.text + "".join(f"{k}: {v}\n" for k, v in answer.headers.multi_items())
    assert SECRET not in everything
    if token:
        assert token not in everything
        # Not even the signature or the payload part on its own.
        for part in token.split("."):
            if len(part) > 8:
                assert part not in everything


# The HS256 server (iss and aud configured) and its client


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running({"ALEX_JWT_ISSUER": ISSUER, "ALEX_JWT_AUDIENCE": AUDIENCE,
                  "ALEX_JWT_LEEWAY_SECONDS": str(LEEWAY)}) as process:
        yield process


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        yield client


def wait_finished(http: httpx.Client, task_id: str, headers: Mapping[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = http.get(f"/api/tasks/{task_id}", headers=dict(headers))
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        if view["status"] not in ("queued", "running"):
            return view
        time.sleep(POLL)
    raise AssertionError(f"task {task_id} did not finish")


@pytest.fixture(scope="module")
def alices_session(http: httpx.Client) -> tuple[str, str]:
    """A session of alice's with one finished task: (session id, task id)."""
    session_id = "alice-private-" + secrets.token_hex(4)
    response = http.post("/api/tasks", json={"task": "$ echo alice-was-here", "session_id": session_id},
                         headers=bearer(hs("alice")))
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    assert wait_finished(http, task_id, bearer(hs("alice")))["status"] == "completed"
    return session_id, task_id


# The 401 matrix


def _bad_tokens() -> dict[str, tuple[Callable[[], str | None], str]]:
    """name -> (token factory, the reason the 401 must name). Factories run at test time (fresh timestamps)."""
    beyond = LEEWAY + 90
    return {
        "no token": (lambda: None, "a bearer token is required"),
        "garbage": (lambda: "not-a-jwt", "malformed token"),
        "expired": (lambda: hs(exp=int(time.time()) - beyond), "token expired"),
        "not yet valid": (lambda: hs(nbf=int(time.time()) + beyond), "token not yet valid"),
        "wrong signature": (lambda: jwt.encode(claims(), OTHER_SECRET, algorithm="HS256"), "bad signature"),
        "payload swapped": (lambda: _swap_payload(hs("mallory", ()), claims("alice", (*ALL, "admin"))),
                            "bad signature"),
        "wrong issuer": (lambda: hs(iss="https://evil.example/"), "wrong issuer"),
        "no issuer": (lambda: hs(iss=None), "missing claim iss"),
        "wrong audience": (lambda: hs(aud="someone-else"), "wrong audience"),
        "no audience": (lambda: hs(aud=None), "missing claim aud"),
        "no sub": (lambda: hs(None), "missing claim sub"),
        "empty sub": (lambda: hs(""), "missing claim sub"),
        "no exp": (lambda: hs(exp=None), "missing claim exp"),
        "alg none": (lambda: unsigned(claims(), {"alg": "none", "typ": "JWT"}), "algorithm not allowed"),
        "alg None": (lambda: unsigned(claims(), {"alg": "None", "typ": "JWT"}), "algorithm not allowed"),
        "alg HS512": (lambda: jwt.encode(claims(), SECRET + SECRET, algorithm="HS512"), "algorithm not allowed"),
    }


def _swap_payload(token: str, new_claims: Mapping[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(new_claims).encode())}.{signature}"


BAD_TOKENS = _bad_tokens()


@pytest.mark.parametrize("route", ROUTES, ids=[r.label for r in ROUTES])
@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_a_bad_token_is_refused_with_401_naming_the_reason(http: httpx.Client, route: Route, case: str) -> None:
    make, reason = BAD_TOKENS[case]
    token = make()
    answer = call(http, route, bearer(token) if token is not None else None)
    check_unauthorized(answer, reason, token)
    if token is None:
        assert answer.headers["www-authenticate"].startswith("Bearer realm=")


@pytest.mark.parametrize("route", ROUTES, ids=[r.label for r in ROUTES])
def test_an_authorization_header_that_is_not_bearer_is_refused(http: httpx.Client, route: Route) -> None:
    token = hs()
    answer = call(http, route, {"Authorization": f"Basic {token}"})
    check_unauthorized(answer, "Bearer <token>", token, error="invalid_request")


@pytest.mark.parametrize("route", ROUTES, ids=[r.label for r in ROUTES])
def test_a_valid_token_passes_authentication_on_every_route(http: httpx.Client, route: Route,
                                                            alices_session: tuple[str, str]) -> None:
    """The control for the matrix above: the same requests with a good token are not refused."""
    session_id, task_id = alices_session
    if route.label in ("POST /api/tasks", "DELETE /api/sessions/{session_id}"):
        # Not alice's shared session: a task there could still run for the next test, and it must not go.
        session_id = "auth-valid-" + secrets.token_hex(4)
        if route.method == "DELETE":
            assert call(http, ROUTES[0], bearer(hs()), session_id=session_id).status == 202
    answer = call(http, route, bearer(hs()), session_id=session_id, task_id=task_id)
    expected = {"POST /api/tasks": 202, "POST /api/tasks/{task_id}/cancel": 409,
                "DELETE /api/sessions/{session_id}": 204}.get(route.label, 200)
    assert answer.status == expected, answer.text
    if answer.first_event is not None:
        assert answer.first_event == {"event": "connected", "data": {"session_id": session_id}}


def test_an_oversized_token_is_refused_without_a_server_error(server: ServerProcess, http: httpx.Client) -> None:
    huge = jwt.encode(claims(padding="p" * 60_000), OTHER_SECRET, algorithm="HS256")
    answer = call(http, Route("GET", "/api/sessions", "sessions:read"), bearer(huge))
    assert answer.status in (400, 401, 413, 431), answer.status
    assert huge not in answer.text
    assert http.get("/health").status_code == 200
    assert not server.events_logged("request_failed")


# Leeway


def test_clock_skew_within_the_leeway_is_accepted(http: httpx.Client) -> None:
    now = int(time.time())
    sessions = Route("GET", "/api/sessions", "sessions:read")
    for token in (hs(nbf=now + LEEWAY // 3), hs(exp=now - LEEWAY // 3), hs(iat=now + LEEWAY // 3)):
        assert call(http, sessions, bearer(token)).status == 200


# Scopes


@pytest.mark.parametrize("route", ROUTES, ids=[r.label for r in ROUTES])
def test_a_token_without_the_routes_scope_gets_403_insufficient_scope(http: httpx.Client, route: Route) -> None:
    others = tuple(s for s in ALL if s != route.scope)
    for token in (hs("alice", others), hs("alice", ())):
        answer = call(http, route, bearer(token))
        body = check_problem(answer, 403)
        assert route.scope in body["detail"]
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith("Bearer")
        assert 'error="insufficient_scope"' in challenge
        assert f'scope="{route.scope}"' in challenge
        assert token not in answer.text


@pytest.mark.parametrize(
    ("scope_claims", "can_read", "can_write_tasks"),
    [
        ({"scope": "sessions:read"}, True, False),
        ({"scopes": ["sessions:read"]}, True, False),
        ({"scope": "tasks:write"}, False, True),
        ({"scopes": ["tasks:write", "sessions:read"]}, True, True),
        ({"scope": "tasks:write", "scopes": ["sessions:read"]}, True, True),
        # Look-alikes and wrong types grant nothing.
        ({"scope": "sessions:read:all tasks:writer"}, False, False),
        ({"scope": "SESSIONS:READ TASKS:WRITE"}, False, False),
        ({"scope": "* sessions:* tasks"}, False, False),
        ({"scope": ["sessions:read", "tasks:write"]}, False, False),
        ({"scopes": "sessions:read tasks:write"}, False, False),
        ({"scope": "sessions:read,tasks:write"}, False, False),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else None,
)
def test_scope_string_and_scopes_list_are_both_honoured(http: httpx.Client, scope_claims: dict[str, Any],
                                                        can_read: bool, can_write_tasks: bool) -> None:
    token = jwt.encode(claims("scoped", (), scope=None) | scope_claims, SECRET, algorithm="HS256")
    read = call(http, Route("GET", "/api/sessions", "sessions:read"), bearer(token))
    assert read.status == (200 if can_read else 403), read.text
    write = call(http, ROUTES[0], bearer(token), session_id="scoped-" + secrets.token_hex(4))
    assert write.status == (202 if can_write_tasks else 403), write.text


def test_admin_reads_another_subjects_session_but_cannot_change_it(http: httpx.Client,
                                                                   alices_session: tuple[str, str]) -> None:
    session_id, task_id = alices_session
    admin = bearer(hs("operator", ("admin",)))
    listed = http.get("/api/sessions", headers=admin)
    assert listed.status_code == 200
    assert session_id in listed.json()["sessions"]
    view = http.get(f"/api/sessions/{session_id}", headers=admin)
    assert view.status_code == 200
    assert "alice-was-here" in json.dumps(view.json()["messages"])
    events = http.get(f"/api/sessions/{session_id}/events", headers=admin)
    assert events.status_code == 200
    assert {e["task_id"] for e in events.json()["events"]} == {task_id}
    assert http.get(f"/api/tasks/{task_id}", headers=admin).status_code == 200
    stream = call(http, ROUTES[-1], admin, session_id=session_id)
    assert stream.status == 200
    assert stream.first_event == {"event": "connected", "data": {"session_id": session_id}}

    # Writes stay the owner's: each answers as if the session did not exist.
    check_problem(call(http, Route("DELETE", "/api/sessions/{session_id}", "sessions:write"), admin,
                       session_id=session_id), 404)
    check_problem(call(http, ROUTES[2], admin, task_id=task_id), 404)
    check_problem(call(http, ROUTES[0], admin, session_id=session_id), 404)
    alice = bearer(hs("alice"))
    still = http.get(f"/api/sessions/{session_id}", headers=alice)
    assert still.status_code == 200
    assert len(still.json()["messages"]) == len(view.json()["messages"])


# Where the token comes from: cookie, query


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"alex_token={token}"}


def test_the_alex_token_cookie_authenticates_reads_and_the_stream(http: httpx.Client,
                                                                 alices_session: tuple[str, str]) -> None:
    session_id, _ = alices_session
    token = hs("alice")
    listed = call(http, Route("GET", "/api/sessions", "sessions:read"), cookie(token))
    assert listed.status == 200
    assert session_id in listed.json()["sessions"]
    stream = call(http, ROUTES[-1], cookie(token), session_id=session_id)
    assert stream.status == 200
    assert stream.first_event == {"event": "connected", "data": {"session_id": session_id}}
    expired = hs("alice", exp=int(time.time()) - 3600)
    check_unauthorized(call(http, ROUTES[-1], cookie(expired), session_id=session_id), "token expired", expired)


def test_a_bad_authorization_header_is_not_rescued_by_a_good_cookie(http: httpx.Client) -> None:
    forged = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    answer = call(http, Route("GET", "/api/sessions", "sessions:read"), {**bearer(forged), **cookie(hs())})
    check_unauthorized(answer, "bad signature", forged)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_cross_site_form_cannot_submit_a_task_with_the_cookie(http: httpx.Client, content_type: str) -> None:
    """CSRF: a form or a no-preflight fetch from another site can only send these types; the API wants JSON."""
    response = http.post("/api/tasks", content=b'{"task": "$ echo csrf"}',
                         headers={**cookie(hs()), "Content-Type": content_type, "Origin": "https://evil.example"})
    check_problem(Answer(response.status_code, response.headers, response.text), 415)
    assert "access-control-allow-origin" not in response.headers


def test_cors_does_not_let_another_origin_read_the_api(http: httpx.Client) -> None:
    preflight = http.options("/api/sessions", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "GET",
                                                       "Access-Control-Request-Headers": "authorization"})
    assert preflight.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")
    read = http.get("/api/sessions", headers={**cookie(hs()), "Origin": "https://evil.example"})
    assert read.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")


def test_the_query_token_works_on_the_stream_only_and_is_never_logged(server: ServerProcess,
                                                                      http: httpx.Client) -> None:
    token = hs("alice")
    forged = jwt.encode(claims("alice"), OTHER_SECRET, algorithm="HS256")
    session_id = "query-token-" + secrets.token_hex(4)
    stream = call(http, Route("GET", f"/api/sse?session_id={session_id}&access_token={token}", "sessions:read"))
    assert stream.status == 200
    assert stream.first_event == {"event": "connected", "data": {"session_id": session_id}}

    submit = http.post("/api/tasks", params={"access_token": token},
                       json={"task": "$ echo via-query", "session_id": session_id})
    check_unauthorized(Answer(submit.status_code, submit.headers, submit.text), "a bearer token is required", None)

    refused = call(http, Route("GET", f"/api/sse?session_id={session_id}&access_token={forged}", "sessions:read"))
    check_unauthorized(refused, "bad signature", forged)

    # The access log line of each request is written when it ends; wait until all three are there.
    deadline = time.monotonic() + 20
    while True:
        logged = [r for r in server.events_logged("http_request") if "access_token" in str(r.get("query", ""))]
        if len(logged) >= 3:
            break
        assert time.monotonic() < deadline, "the access log never recorded the three requests"
        time.sleep(POLL)
    assert all("redacted" in str(record["query"]) for record in logged)
    for line in list(server.raw_logs):
        for secret in (token, forged, SECRET):
            assert secret not in line
            for part in secret.split(".")[1:]:
                assert part not in line


# PEM public keys: RS256, ES256, and algorithm confusion


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def rs_server(rsa_private: rsa.RSAPrivateKey) -> Iterator[ServerProcess]:
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as handle:
        handle.write(public_pem(rsa_private))
    try:
        with running({"ALEX_JWT_PUBLIC_KEY_FILE": handle.name}, without=("ALEX_JWT_SECRET",)) as process:
            yield process
    finally:
        os.unlink(handle.name)


def pem_claims(sub: str = "alice") -> dict[str, Any]:
    return claims(sub, ALL, issuer=False)


def sessions_status(server: ServerProcess, token: str) -> httpx.Response:
    return httpx.get(server.base_url + "/api/sessions", headers=bearer(token), timeout=10)


@pytest.mark.parametrize("algorithm", ["RS256", "RS512", "PS256"])
def test_a_token_signed_with_the_rsa_key_is_accepted(rs_server: ServerProcess, rsa_private: rsa.RSAPrivateKey,
                                                     algorithm: str) -> None:
    token = jwt.encode(pem_claims(), rsa_private, algorithm=algorithm)
    assert sessions_status(rs_server, token).status_code == 200


def test_hs256_signed_with_the_public_pem_is_refused(rs_server: ServerProcess,
                                                      rsa_private: rsa.RSAPrivateKey) -> None:
    """Algorithm confusion: the public key's bytes used as an HMAC secret."""
    pem = public_pem(rsa_private)
    for key in (pem, pem.strip(), pem.decode().replace("\n", "").encode()):
        token = hmac_signed(pem_claims(), key)
        response = sessions_status(rs_server, token)
        check_unauthorized(Answer(response.status_code, response.headers, response.text), "algorithm not allowed",
                           token)


def test_the_rsa_server_refuses_other_keys_and_unsigned_tokens(rs_server: ServerProcess) -> None:
    cases = {
        jwt.encode(pem_claims(), rsa_key(), algorithm="RS256"): "bad signature",
        unsigned(pem_claims(), {"alg": "none", "typ": "JWT"}): "algorithm not allowed",
        jwt.encode(pem_claims(), SECRET, algorithm="HS256"): "algorithm not allowed",
        jwt.encode(pem_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"):
            "algorithm not allowed",
    }
    for token, reason in cases.items():
        response = sessions_status(rs_server, token)
        check_unauthorized(Answer(response.status_code, response.headers, response.text), reason, token)


def test_es256_tokens_are_accepted_with_the_matching_ec_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with running({"ALEX_JWT_PUBLIC_KEY": public_pem(key).decode()}, without=("ALEX_JWT_SECRET",)) as es_server:
        assert sessions_status(es_server, jwt.encode(pem_claims(), key, algorithm="ES256")).status_code == 200
        refused = {
            jwt.encode(pem_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"): "bad signature",
            hmac_signed(pem_claims(), public_pem(key)): "algorithm not allowed",
            jwt.encode(pem_claims(), rsa_key(), algorithm="RS256"): "algorithm not allowed",
            unsigned(pem_claims(), {"alg": "none"}): "algorithm not allowed",
        }
        for token, reason in refused.items():
            response = sessions_status(es_server, token)
            check_unauthorized(Answer(response.status_code, response.headers, response.text), reason, token)


# JWKS


class JwksServer:
    """A tiny identity provider: serves ``document`` at /jwks.json on 127.0.0.1 and counts the fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self._stopped = False

    def serve(self, **keys: rsa.RSAPrivateKey | dict[str, Any]) -> None:
        entries = []
        for kid, key in keys.items():
            if isinstance(key, dict):
                entries.append({**key, "kid": kid})
            else:
                entries.append({**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256",
                                "use": "sig"})
        self.document = {"keys": entries}

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    provider = JwksServer()
    try:
        yield provider
    finally:
        provider.stop()


def rs(key: rsa.RSAPrivateKey, kid: str, sub: str = "alice") -> str:
    return jwt.encode(pem_claims(sub), key, algorithm="RS256", headers={"kid": kid})


def refused_as(server: ServerProcess, token: str, reason: str) -> None:
    response = sessions_status(server, token)
    check_unauthorized(Answer(response.status_code, response.headers, response.text), reason, token)


def test_jwks_rotation_unknown_kids_and_an_outage(jwks: JwksServer) -> None:
    k1, k2 = rsa_key(), rsa_key()
    oct_secret = secrets.token_bytes(32)
    jwks.serve(k1=k1)
    # A short refresh floor keeps the test quick; the made-up kids below still arrive well within it.
    with running({"ALEX_JWT_JWKS_URL": jwks.url, "ALEX_JWT_JWKS_MIN_REFRESH_SECONDS": "3"},
                 without=("ALEX_JWT_SECRET",)) as server:
        assert sessions_status(server, rs(k1, "k1")).status_code == 200
        assert jwks.fetches == 1
        # Confusion through the key set: k1's public key as an HMAC secret, and no signature at all.
        pem = public_pem(k1)
        refused_as(server, hmac_signed(pem_claims(), pem, kid="k1"), "algorithm not allowed")
        refused_as(server, unsigned(pem_claims(), {"alg": "none", "kid": "k1"}), "algorithm not allowed")

        # Rotation: k2 replaces k1; a shared-secret key slipped into the set must never be trusted.
        jwks.serve(k2=k2, shared={"kty": "oct", "k": b64url(oct_secret), "alg": "HS256"})
        token2 = rs(k2, "k2")
        deadline = time.monotonic() + 20
        while (answer := sessions_status(server, token2)).status_code != 200:
            # Until the set may be fetched again (3 s after the last fetch) the new kid is just unknown.
            check_unauthorized(Answer(answer.status_code, answer.headers, answer.text), "unknown signing key",
                               token2)
            assert time.monotonic() < deadline, "the rotated key was never fetched"
            time.sleep(0.25)
        assert jwks.fetches == 2, "polling with an unknown kid fetched the key set more than once"
        refused_as(server, rs(k1, "k1"), "unknown signing key")
        refused_as(server, hmac_signed(pem_claims(), oct_secret, kid="shared"), "unknown signing key")
        refused_as(server, rs(rsa_key(), "k3"), "unknown signing key")

        # Made-up kids cannot make the server hammer the identity provider.
        for kid in [secrets.token_hex(6) for _ in range(16)] + ["../../etc/passwd", "' OR 1=1 --", "", "#0"]:
            refused_as(server, rs(k2, kid), "unknown signing key")
        assert jwks.fetches == 2

        # A token cannot bring its own key: jku and x5u (where to fetch it) and jwk (the key itself) are ignored.
        evil, attacker = rsa_key(), JwksServer()
        try:
            attacker.serve(evil=evil)
            own_jwk = {**RSAAlgorithm.to_jwk(evil.public_key(), as_dict=True), "kid": "evil"}
            for extra in ({"jku": attacker.url}, {"x5u": attacker.url}, {"jwk": own_jwk}):
                forged = jwt.encode(pem_claims(), evil, algorithm="RS256", headers={"kid": "evil", **extra})
                refused_as(server, forged, "unknown signing key")
                forged = jwt.encode(pem_claims(), evil, algorithm="RS256", headers={"kid": "k2", **extra})
                refused_as(server, forged, "bad signature")
            assert attacker.fetches == 0
        finally:
            attacker.stop()
        assert jwks.fetches == 2

        # Outage: keys already fetched keep working; an unknown kid is still 401 (never 503, never 500).
        jwks.stop()
        assert sessions_status(server, token2).status_code == 200
        deadline = time.monotonic() + 20
        while not server.events_logged("jwks_fetch_failed"):
            refused_as(server, rs(k2, "k3-" + secrets.token_hex(4)), "unknown signing key")
            assert time.monotonic() < deadline, "the server never tried to fetch the key set again"
            time.sleep(0.25)
        refused_as(server, rs(k2, "k4"), "unknown signing key")
        assert sessions_status(server, token2).status_code == 200
        assert not server.events_logged("request_failed")



def test_a_server_that_cannot_fetch_its_keys_answers_503_never_500() -> None:
    key = rsa_key()
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    with running({"ALEX_JWT_JWKS_URL": url}, without=("ALEX_JWT_SECRET",)) as server:
        for token in (rs(key, "k1"), rs(key, "k1"), jwt.encode(pem_claims(), key, algorithm="RS256")):
            response = sessions_status(server, token)
            body = check_problem(Answer(response.status_code, response.headers, response.text), 503)
            assert int(response.headers["retry-after"]) > 0
            assert "unavailable" in body["detail"]
            assert token not in response.text
        # A token that is not even a JWT needs no key to be refused.
        refused_as(server, "not-a-jwt", "malformed token")
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        assert not server.events_logged("request_failed")


# alex-server token


def alex_server(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ALEX_SERVER), *args], env={**clean_environment(), **env}, capture_output=True,
                          text=True, timeout=60, check=False)


def test_alex_server_token_mints_a_token_with_the_asked_scope_and_ttl(server: ServerProcess,
                                                                       http: httpx.Client) -> None:
    env = {"ALEX_JWT_SECRET": SECRET, "ALEX_DATA_DIR": str(server.data_dir), "ALEX_JWT_ISSUER": ISSUER,
           "ALEX_JWT_AUDIENCE": AUDIENCE}
    done = alex_server(env, "token", "--sub", "x", "--scope", "sessions:read", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    seen = jwt.decode(token, options={"verify_signature": False})
    assert seen["sub"] == "x"
    assert seen["scope"] == "sessions:read"
    assert seen["exp"] - seen["iat"] == 60
    assert http.get("/api/sessions", headers=bearer(token)).status_code == 200
    refused = http.post("/api/tasks", json={"task": "$ echo no"}, headers=bearer(token))
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


def test_alex_server_token_refuses_to_mint_for_an_external_key(tmp_path: Path) -> None:
    pem = public_pem(rsa_key()).decode()
    done = alex_server({"ALEX_JWT_PUBLIC_KEY": pem, "ALEX_DATA_DIR": str(tmp_path / "data")},
                       "token", "--sub", "x")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "ALEX_JWT_PUBLIC_KEY" in done.stderr
    assert not (tmp_path / "data" / "jwt_secret").exists()


def test_alex_server_token_refuses_an_unknown_scope(tmp_path: Path) -> None:
    done = alex_server({"ALEX_JWT_SECRET": SECRET, "ALEX_DATA_DIR": str(tmp_path / "data")},
                       "token", "--sub", "x", "--scope", "sessions:read root")
    assert done.returncode == 2
    assert done.stdout == ""


def test_the_generated_secret_is_private_and_tokens_minted_for_it_work() -> None:
    with running(without=("ALEX_JWT_SECRET",)) as server:
        secret_file = server.data_dir / "jwt_secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        done = alex_server({"ALEX_DATA_DIR": str(server.data_dir)}, "token", "--sub", "fresh")
        assert done.returncode == 0, done.stderr
        assert sessions_status(server, done.stdout.strip()).status_code == 200
        assert sessions_status(server, jwt.encode(pem_claims(), SECRET, algorithm="HS256")).status_code == 401
        secret = secret_file.read_text().strip()
        assert all(secret not in line for line in server.raw_logs)


@pytest.mark.parametrize("secret", ["", "tiny-s3cr3t", "31-bytes-is-one-short-of-enough"])
def test_an_empty_or_short_secret_is_a_one_line_configuration_error(tmp_path: Path, secret: str) -> None:
    """HS256 wants at least 32 bytes of key (RFC 7518 3.2): a short one could be brute-forced from one token."""
    assert len(secret.encode()) < 32
    done = alex_server({"ALEX_JWT_SECRET": secret, "ALEX_DATA_DIR": str(tmp_path / "data")}, "token", "--sub", "x")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "ALEX_JWT_SECRET" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if secret:
        assert secret not in done.stderr
