"""The web UI's routes over real sockets, without a browser: sign-in and its cookie, the development sign-in, CSRF,
content security policies, bad input and ownership. The HTML stream is in test_ui_stream.py, the browser itself in
tests/browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.server import ServerProcess, fresh_data_root, running, token
from tests.integration.ui_calls import api, assert_problem, browser, new_session, origin, set_cookie

pytestmark = pytest.mark.integration

API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
UI_SCRIPT_SOURCES = "script-src 'self'"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running() as process:
        yield process


@pytest.fixture(scope="module")
def generated_secret_server() -> Iterator[ServerProcess]:
    """A server that made its own development secret (no ALEX_JWT_SECRET)."""
    root = fresh_data_root()
    process = ServerProcess(root / "data", secret=None).start()
    try:
        yield process
    finally:
        process.kill()
        shutil.rmtree(root, ignore_errors=True)


# Sign-in, cookie, sign-out


def test_the_page_sends_a_visitor_without_a_token_to_sign_in(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        response = client.get("/", params={"session_id": "s_0123456789abcdef"})
        assert response.status_code == 303
        assert response.headers["location"] == "/ui/sign-in?session_id=s_0123456789abcdef"
        page = client.get("/ui/sign-in")
        assert page.status_code == 200
        assert 'name="token"' in page.text
        assert "Sign in as developer" not in page.text, "a configured secret offers no development sign-in"
        # A link on another site brings no SameSite=Strict cookie: the page asks for itself again, from this site.
        bounce = client.get("/", headers={"Sec-Fetch-Site": "cross-site"})
        assert bounce.status_code == 200
        assert '<meta http-equiv="refresh" content="0">' in bounce.text
    # A refused cookie is dropped on the way to the sign-in page.
    with httpx.Client(base_url=server.base_url, cookies={"alex_token": "not-a-jwt"}) as client:
        refused = client.get("/")
        assert refused.status_code == 303
        assert set_cookie(refused)["alex_token"]["max-age"] == "0"


def test_sign_in_keeps_the_token_in_a_strict_http_only_cookie_no_longer_than_it_lives(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, headers=origin(server)) as client:
        response = client.post("/ui/sign-in", data={"token": token(ttl=600), "session_id": "s_1"})
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/?session_id=s_1"
        cookie = set_cookie(response)["alex_token"]
        assert cookie.value == client.cookies["alex_token"]
        assert cookie["httponly"] is True
        assert cookie["samesite"].lower() == "strict"
        assert cookie["path"] == "/"
        assert 590 <= int(cookie["max-age"]) <= 600
        assert not cookie["secure"], "plain http: a Secure cookie would never come back"
        page = client.get("/")
        assert page.status_code == 200
        assert "Signed in as <strong>alice</strong>" in page.text

        # htmx's own request is told where to go instead of being redirected.
        htmx = client.post("/ui/sign-in", data={"token": token()}, headers={"HX-Request": "true"})
        assert htmx.status_code == 200
        assert htmx.headers["HX-Redirect"] == "/"

        signed_out = client.post("/ui/sign-out")
        assert signed_out.status_code == 303
        assert signed_out.headers["location"] == "/ui/sign-in"
        assert set_cookie(signed_out)["alex_token"]["max-age"] == "0"
        assert client.get("/").status_code == 303


def test_the_cookie_is_secure_behind_https(server: ServerProcess) -> None:
    # uvicorn takes X-Forwarded-Proto from a proxy on 127.0.0.1 (its default FORWARDED_ALLOW_IPS).
    headers = {"Origin": f"https://127.0.0.1:{server.port}", "X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=server.base_url, headers=headers) as client:
        response = client.post("/ui/sign-in", data={"token": token()})
        assert response.status_code == 303, response.text
        assert set_cookie(response)["alex_token"]["secure"] is True


def test_sign_in_refuses_what_is_not_a_usable_token(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, headers=origin(server)) as client:
        bad = client.post("/ui/sign-in", data={"token": "eyJ.bad.token"})
        assert_problem(bad, 401)
        assert "set-cookie" not in bad.headers
        assert_problem(client.post("/ui/sign-in", data={"token": " "}), 422)
        assert_problem(client.post("/ui/sign-in", data={"token": token(scopes=("tasks:write",))}), 403)
        assert_problem(client.post("/ui/sign-in", data={"token": token(), "session_id": "../x"}), 422)
        assert_problem(client.post("/ui/sign-in", json={"token": token()}), 415)


# CSRF and content security policies


def test_ui_posts_and_deletes_from_another_origin_are_refused(server: ServerProcess) -> None:
    with browser(server) as client, api(server) as alice:
        session_id = new_session(client)
        form = {"task": "$ echo csrf", "session_id": session_id}
        refused = [
            client.post("/ui/tasks", data=form, headers={"Origin": "http://evil.example"}),
            client.post("/ui/tasks", data=form, headers={"Origin": "null"}),
            client.post("/ui/tasks", data=form, headers={"Origin": f"https://127.0.0.1:{server.port}"}),
            client.delete(f"/ui/sessions/{session_id}", headers={"Origin": "http://evil.example"}),
            client.post("/ui/sessions", headers={"Origin": "http://evil.example"}),
            client.post("/ui/sign-in", data={"token": token()}, headers={"Origin": "http://evil.example"}),
            client.post("/ui/sign-out", headers={"Origin": "http://evil.example"}),
        ]
        for response in refused:
            assert_problem(response, 403)
        with httpx.Client(base_url=server.base_url, cookies={"alex_token": token()}) as no_origin:
            assert_problem(no_origin.post("/ui/tasks", data=form), 403)
            assert_problem(no_origin.post("/ui/tasks", data=form, headers={"Sec-Fetch-Site": "cross-site"}), 403)
            assert_problem(no_origin.post("/ui/tasks", data=form, headers={"Origin": "null",
                                                                           "Sec-Fetch-Site": "cross-site"}), 403)
        assert alice.get(f"/api/sessions/{session_id}").json()["messages"] == [], "a refused task ran"
        with httpx.Client(base_url=server.base_url, cookies={"alex_token": token()}) as same_site:
            accepted = same_site.post("/ui/tasks", data=form, headers={"Sec-Fetch-Site": "same-origin"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["location"].startswith("/api/tasks/t_")
        # A plain form on a no-referrer page sends Origin: null; the browser's Sec-Fetch-Site vouches for it.
        with httpx.Client(base_url=server.base_url) as plain_form:
            signed_out = plain_form.post("/ui/sign-out", headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
        assert signed_out.status_code == 303


def test_ui_pages_have_their_own_policy_and_the_api_keeps_its_own(server: ServerProcess) -> None:
    with browser(server) as client:
        for path in ("/", "/ui/sign-in", "/ui/static/app.js"):
            policy = client.get(path).headers["content-security-policy"]
            assert UI_SCRIPT_SOURCES in policy
            assert "'unsafe-inline'" not in policy
            assert "'unsafe-eval'" not in policy
            assert "frame-ancestors 'none'" in policy
        for path in ("/health", "/api/sessions", "/openapi.json"):
            assert client.get(path).headers["content-security-policy"] == API_POLICY


def test_the_vendored_scripts_are_served_by_the_service(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        for path in ("/ui/static/vendor/htmx.min.js", "/ui/static/vendor/sse.min.js", "/ui/static/app.js"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/app.css").headers["content-type"].startswith("text/css")
        assert "htmx.org" in client.get("/ui/static/vendor/README.md").text
        assert_problem(client.get("/ui/static/missing.js"), 404)
        assert_problem(client.get("/ui/static/%2e%2e/%2e%2e/main.py"), 404)


# Sessions, tasks, ownership and bad input


def test_sessions_are_made_listed_and_deleted_through_the_ui(server: ServerProcess) -> None:
    with browser(server) as client:
        session_id = new_session(client)
        page = client.get("/", params={"session_id": session_id})
        assert page.status_code == 200
        assert f'sse-connect="/ui/sse?session_id={session_id}"' in page.text
        assert f'data-session-id="{session_id}"' in page.text
        other = new_session(client)
        # Deleting a session that is not the one open leaves the page as it is...
        kept = client.delete(f"/ui/sessions/{other}", headers={"HX-Current-URL": f"{server.base_url}/?session_id="
                                                                                   f"{session_id}"})
        assert kept.status_code == 200
        assert kept.headers["HX-Reswap"] == "none"
        assert 'hx-swap-oob="delete"' in kept.text
        # ... deleting the open one empties it and takes the session out of the address.
        gone = client.delete(f"/ui/sessions/{session_id}",
                             headers={"HX-Current-URL": f"{server.base_url}/?session_id={session_id}"})
        assert (gone.headers["HX-Retarget"], gone.headers["HX-Push-Url"]) == ("#main", "/")
        listed = client.get("/").text
        assert session_id not in listed
        assert other not in listed
        assert_problem(client.get("/", params={"session_id": session_id}), 404)


def test_another_subject_never_sees_a_session_through_the_ui(server: ServerProcess) -> None:
    with browser(server, "alice") as alice, browser(server, "bob") as bob:
        session_id = new_session(alice)
        assert_problem(bob.get("/", params={"session_id": session_id}), 404)
        assert_problem(bob.get(f"/ui/sessions/{session_id}"), 404)
        assert_problem(bob.get("/ui/sse", params={"session_id": session_id}), 404)
        assert_problem(bob.post("/ui/tasks", data={"task": "$ id", "session_id": session_id}), 404)
        assert_problem(bob.delete(f"/ui/sessions/{session_id}"), 404)
        assert session_id not in bob.get("/").text
        assert alice.get("/", params={"session_id": session_id}).status_code == 200


def test_bad_input_is_a_problem_never_a_500(server: ServerProcess) -> None:
    with browser(server) as client:
        session_id = new_session(client)
        assert_problem(client.post("/ui/tasks", json={"task": "x", "session_id": session_id}), 415)
        assert_problem(client.post("/ui/tasks", data={"session_id": session_id}), 422)
        assert_problem(client.post("/ui/tasks", data={"task": "  ", "session_id": session_id}), 422)
        assert_problem(client.post("/ui/tasks", data={"task": "x"}), 422)
        assert_problem(client.post("/ui/tasks", data={"task": "x", "session_id": "a/b"}), 422)
        assert_problem(client.post("/ui/tasks", data={"task": "x" * 40_000, "session_id": session_id}), 422)
        assert_problem(client.post("/ui/tasks", content=b"task=%ff%fe&session_id=x",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)
        many = "&".join(f"f{n}=1" for n in range(50)).encode()
        assert_problem(client.post("/ui/tasks", content=many,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)
        assert_problem(client.get("/", params={"session_id": "bad id!"}), 422)
        assert_problem(client.get("/", params={"session_id": "s_ffffffffffffffff"}), 404)
        assert_problem(client.get("/ui/sse", params={"session_id": session_id, "last_event_id": "abc"}), 400)
        assert_problem(client.get("/ui/sse", params={"session_id": "../etc"}), 422)
        assert_problem(client.post("/ui/tasks/t_0000000000000000/cancel"), 404)
        assert_problem(client.get("/ui/sessions/s_ffffffffffffffff"), 404)
    with httpx.Client(base_url=server.base_url, headers=origin(server)) as anonymous:
        assert_problem(anonymous.get("/ui/sse", params={"session_id": "s_1"}), 401)
        assert_problem(anonymous.post("/ui/sessions"), 401)
    with httpx.Client(base_url=server.base_url, headers=origin(server),
                      cookies={"alex_token": token(scopes=("sessions:read",))}) as reader:
        assert_problem(reader.post("/ui/sessions"), 403)
    assert not server.events_logged("request_failed")


# The development sign-in


def test_the_development_sign_in_works_only_on_localhost(generated_secret_server: ServerProcess) -> None:
    server = generated_secret_server
    port = server.port
    with httpx.Client(base_url=server.base_url, headers=origin(server)) as client:
        assert "Sign in as developer" in client.get("/ui/sign-in").text
        signed_in = client.post("/ui/dev-sign-in", data={"session_id": ""})
        assert signed_in.status_code == 303, signed_in.text
        cookie = set_cookie(signed_in)["alex_token"]
        assert cookie["httponly"] is True
        assert cookie["samesite"].lower() == "strict"
        assert 0 < int(cookie["max-age"]) <= 3600
        assert "Signed in as <strong>developer</strong>" in client.get("/").text
        assert client.get("/api/sessions").status_code == 200, "the cookie authenticates the API as well"
    for host in ("localhost", "[::1]"):
        with httpx.Client(base_url=server.base_url, headers={"Host": f"{host}:{port}",
                                                             "Origin": f"http://{host}:{port}"}) as named:
            assert named.post("/ui/dev-sign-in").status_code == 303
    # Another name for this machine (a proxy, a DNS-rebinding page) and a client elsewhere are refused.
    foreign = {"Host": f"alex.example:{port}", "Origin": f"http://alex.example:{port}"}
    with httpx.Client(base_url=server.base_url, headers=foreign) as rebinding:
        assert "Sign in as developer" not in rebinding.get("/ui/sign-in").text
        assert_problem(rebinding.post("/ui/dev-sign-in"), 403)
    with httpx.Client(base_url=server.base_url, headers={**origin(server), "X-Forwarded-For": "203.0.113.9"}) as far:
        assert "Sign in as developer" not in far.get("/ui/sign-in").text
        assert_problem(far.post("/ui/dev-sign-in"), 403)


def test_the_development_sign_in_is_refused_with_a_configured_secret(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, headers=origin(server)) as client:
        response = client.post("/ui/dev-sign-in")
        assert_problem(response, 403)
        assert "set-cookie" not in response.headers


def test_the_ui_works_with_auth_disabled() -> None:
    with running(ALEX_AUTH="disabled") as server, httpx.Client(base_url=server.base_url,
                                                               headers=origin(server)) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "Sign out" not in page.text
        assert client.get("/ui/sign-in").status_code == 303
        session_id = new_session(client)
        assert client.post("/ui/tasks", data={"task": "$ true", "session_id": session_id}).status_code == 202
