"""A page rides out a server restart: its stream reconnects by itself and resumes after the last event it got, with
no gap and nothing twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import MOCK_DELAY_MS, Browsing
from tests.browser.pages import answer, new_session, run
from tests.integration.server import ServerProcess, free_port, running

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A server on a fixed port, so that the same address answers again after a restart."""
    with running(PORT=str(free_port()), ALEX_MOCK_DELAY_MS=MOCK_DELAY_MS) as process:
        yield process


def test_the_page_resumes_after_a_server_restart(browsing: Browsing) -> None:
    server = browsing.server
    page = browsing.page()
    new_session(page, server)
    run(page, "$ echo before the restart")
    answer(page)
    conn, notice = page.locator("#conn"), page.locator("#stream-notice")

    server.stop()
    expect(notice).to_contain_text("The server is shutting down")
    expect(conn).to_have_attribute("data-state", "reconnecting")
    server.start()
    expect(conn).to_have_attribute("data-state", "live")
    expect(notice).to_contain_text("resumed after event")

    run(page, "$ echo after the restart")
    expect(page.locator(".final")).to_have_count(2)
    assert "after the restart" in answer(page)
    expect(page.locator(".task")).to_have_count(2)
    expect(page.locator(".iteration")).to_have_count(4)
    # While the server was down, Chromium logged each refused reconnection itself: expected here, nowhere else.
    browsing.errors[:] = [error for error in browsing.errors if "net::ERR_CONNECTION_REFUSED" not in error]
