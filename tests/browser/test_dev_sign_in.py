"""The one-click development sign-in, in Chromium, against a server that made its own secret (no ALEX_JWT_SECRET)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import Browsing, start_server
from tests.integration.server import ServerProcess

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    yield from start_server(generated_secret=True)


def test_the_development_sign_in_on_localhost(browsing: Browsing) -> None:
    server = browsing.server
    context = browsing.context(signed_in_as=None)
    page = browsing.page(context)
    page.goto(server.base_url + "/")
    expect(page).to_have_url(server.base_url + "/ui/sign-in")
    page.get_by_role("button", name="Sign in as developer").click()
    expect(page).to_have_url(server.base_url + "/")
    expect(page.get_by_text("Signed in as developer")).to_be_visible()
    (cookie,) = context.cookies()
    assert cookie["name"] == "alex_token"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    page.get_by_role("button", name="New session").click()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
