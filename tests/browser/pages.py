"""What the browser tests do on the app's page again and again."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.integration.server import ServerProcess

SESSION_URL = re.compile(r"/\?session_id=s_[0-9a-f]{16}")


def new_session(page: Page, server: ServerProcess) -> str:
    """Open the app, press "New session"; returns the session id the address bar then shows."""
    if not page.url.startswith(server.base_url + "/"):
        page.goto(server.base_url + "/")
    with page.expect_response(lambda response: response.request.method == "POST"
                              and response.url == server.base_url + "/ui/sessions") as created:
        page.get_by_role("button", name="New session").click()
    pushed = created.value.headers["hx-push-url"]
    assert SESSION_URL.fullmatch(pushed), pushed
    session_id = pushed.rsplit("=", 1)[1]
    expect(page).to_have_url(server.base_url + pushed)
    expect(page.locator("#session")).to_have_attribute("data-session-id", session_id)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    return session_id


def run(page: Page, task: str) -> None:
    """Type ``task`` into the task box and press Run."""
    page.locator("#task").fill(task)
    page.get_by_role("button", name="Run").click()


def answer(page: Page) -> str:
    """The last answer, once it is there and the task box is open again."""
    final = page.locator(".final .answer").last
    expect(final).to_be_visible()
    expect(page.locator("#task")).to_be_enabled()
    return final.inner_text()
