"""Browser tests: real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) against the real
server, a child process on 127.0.0.1:0 with the offline mock model.

Skipped, saying why, only when Chromium or the playwright package is missing; ``make test`` installs both
(``make system-deps`` installs Debian's ``chromium``, the ``dev`` extras ``playwright``). Playwright's own browser
download (``playwright install``) is never used: it needs the internet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[dev]'")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make system-deps does it as root)",
                allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    sync_playwright,
)

from tests.integration.server import SECRET, ServerProcess, running, token  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
"""Without the network flags Chromium calls out at start; the closed network refuses and start-up slows."""
MOCK_DELAY_MS = "20"
"""Slow enough that the model's text visibly streams in word by word, fast enough for a quick suite."""
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000

# Every page reports content-security-policy violations to its console (Chromium also logs them itself).
_REPORT_CSP = """
document.addEventListener('securitypolicyviolation', (event) => {
  console.error('CSP violation: ' + event.violatedDirective + ' ' + event.blockedURI);
});
"""


@pytest.fixture(scope="package")
def chromium() -> Iterator[Browser]:
    # Package scope, not session: Playwright's sync API runs its own event loop on this thread while it is open,
    # and the asyncio tests that follow this package need the thread to themselves.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def start_server(*, generated_secret: bool = False) -> Iterator[ServerProcess]:
    """A server with the mock model; with ``generated_secret`` it has no ALEX_JWT_SECRET and makes its own."""
    with running(secret=None if generated_secret else SECRET, ALEX_MOCK_DELAY_MS=MOCK_DELAY_MS) as process:
        yield process


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server per module (its tests use sessions of their own): the mock model, a configured secret."""
    yield from start_server()


@dataclass
class Browsing:
    """The pages a test opens, and every console error, uncaught exception or CSP violation on any of them."""

    browser: Browser
    server: ServerProcess
    errors: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)

    def context(self, *, signed_in_as: str | None = "alice", viewport: ViewportSize = LAPTOP) -> BrowserContext:
        """A fresh browser profile (cookies of its own), with the ``alex_token`` cookie already set unless
        ``signed_in_as`` is None."""
        context = self.browser.new_context(viewport=viewport)
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(_REPORT_CSP)
        if signed_in_as is not None:
            context.add_cookies([{"name": "alex_token", "value": token(signed_in_as), "url": self.server.base_url,
                                  "httpOnly": True, "sameSite": "Strict"}])
        self.contexts.append(context)
        return context

    def page(self, context: BrowserContext | None = None) -> Page:
        page = (context or self.context()).new_page()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console {message.type}: {message.text}")

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def browsing(chromium: Browser, server: ServerProcess) -> Iterator[Browsing]:
    """Opens pages against the module's server; the test fails if any page logged an error."""
    session = Browsing(chromium, server)
    try:
        yield session
    finally:
        session.close()
    assert session.errors == [], "errors in the browser's console"

