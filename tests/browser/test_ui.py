"""The web UI in real headless Chromium: sign in, start a session, run tasks and watch them stream, reload, follow
one session from two pages, cancel, hostile text, keyboard only, a phone's screen; no console errors anywhere
(the ``browsing`` fixture fails a test whose pages logged one, a CSP violation included).

With ``ALEX_UI_SCREENSHOT=docs/ui.png`` the first test saves its finished task as the README's screenshot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PHONE, Browsing
from tests.browser.pages import SESSION_URL, answer, new_session, run
from tests.integration.server import token

pytestmark = pytest.mark.browser

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'

# Records every length the model's messages go through, to see the text arrive word by word.
_RECORD_MESSAGES = """() => {
  window.__lengths = [];
  const timeline = document.getElementById('timeline');
  new MutationObserver(() => {
    for (const message of timeline.querySelectorAll('[data-role=thinking]')) {
      window.__lengths.push([message.id, message.textContent.length]);
    }
  }).observe(timeline, {subtree: true, childList: true, characterData: true});
}"""


def streamed_in_pieces(page: Page) -> bool:
    """Whether some message of the model grew through at least three lengths before it was whole."""
    lengths: list[tuple[str, int]] = page.evaluate("() => window.__lengths")
    seen: dict[str, set[int]] = {}
    for element_id, length in lengths:
        seen.setdefault(element_id, set()).add(length)
    return any(len({n for n in values if n > 0}) >= 3 for values in seen.values())


def test_sign_in_run_a_task_and_find_it_again_after_a_reload(browsing: Browsing) -> None:
    server = browsing.server
    page = browsing.page(browsing.context(signed_in_as=None))
    page.goto(server.base_url + "/")
    expect(page).to_have_url(server.base_url + "/ui/sign-in")
    expect(page.get_by_role("button", name="Sign in as developer")).to_have_count(0)
    page.get_by_label("Access token (JWT)").fill(token("alice"))
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(server.base_url + "/")
    expect(page.get_by_text("Signed in as alice")).to_be_visible()

    session_id = new_session(page, server)
    expect(page.locator("#session-list a[aria-current=page]")).to_have_text(session_id)
    page.evaluate(_RECORD_MESSAGES)
    run(page, "$ echo hello from the browser")
    tool = page.locator(".tool[data-tool=bash]")
    expect(tool.locator(".tool-name")).to_have_text("bash")
    expect(tool.locator(".tool-brief")).to_have_text("echo hello from the browser")
    expect(tool.locator(".tool-output")).to_have_text("hello from the browser\n")
    expect(tool.locator(".tool-status")).to_have_attribute("data-status", "ok")
    assert "hello from the browser" in answer(page)
    expect(page.locator(".task-status")).to_have_text("completed")
    expect(page.locator("#task")).to_have_value("")
    assert streamed_in_pieces(page), "the model's text arrived whole, not streamed"
    expect(page.locator(".iteration")).to_have_count(2)

    screenshot = os.environ.get("ALEX_UI_SCREENSHOT")
    if screenshot:
        page.screenshot(path=str(Path(screenshot)), full_page=True)

    history = page.locator("#timeline").inner_text()
    page.reload()
    answer(page)
    assert page.locator("#timeline").inner_text() == history
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(server.base_url + "/ui/sign-in")


def test_two_pages_follow_one_session_live(browsing: Browsing) -> None:
    server = browsing.server
    context = browsing.context()
    first = browsing.page(context)
    new_session(first, server)
    second = browsing.page(context)
    second.goto(first.url)
    expect(second.locator("#conn")).to_have_attribute("data-state", "live")

    run(first, "$ sleep 1; echo seen on both pages")
    expect(second.locator("#task")).to_be_disabled()  # a task runs: the other page's box is closed too
    expect(second.get_by_role("button", name="Cancel")).to_be_visible()
    expect(second.locator(".tool-output")).to_have_text("seen on both pages\n")
    assert "seen on both pages" in answer(second)
    assert "seen on both pages" in answer(first)
    assert first.locator("#timeline").inner_text() == second.locator("#timeline").inner_text()


def test_cancel_a_long_task(browsing: Browsing) -> None:
    page = browsing.page()
    new_session(page, browsing.server)
    run(page, "$ sleep 30")
    expect(page.locator(".tool[data-tool=bash] .tool-brief")).to_have_text("sleep 30")
    expect(page.locator("#task")).to_be_disabled()
    expect(page.get_by_role("button", name="Run")).to_be_disabled()
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".outcome.cancelled")).to_contain_text("cancelled by the client")
    expect(page.locator(".task-status")).to_have_text("cancelled")
    expect(page.locator("#task")).to_be_enabled()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)


def test_a_hostile_task_shows_as_text_and_runs_nothing(browsing: Browsing) -> None:
    page = browsing.page()
    new_session(page, browsing.server)
    run(page, HOSTILE)
    assert "<script>" in answer(page), "the model's answer quotes the task as text"
    expect(page.locator(".task-text")).to_have_text(HOSTILE)
    expect(page.locator(".analysis")).to_contain_text(HOSTILE)
    expect(page.locator("#timeline img")).to_have_count(0)
    expect(page.locator("#timeline script")).to_have_count(0)
    assert page.evaluate("() => window.__pwned") is None


def test_keyboard_only(browsing: Browsing) -> None:
    page = browsing.page()
    page.goto(browsing.server.base_url + "/")
    tab_to(page, "button.new-session")
    page.keyboard.press("Enter")
    expect(page).to_have_url(SESSION_URL)
    tab_to(page, "#task")
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused task box shows no focus ring"
    page.keyboard.type("$ echo typed without a mouse")
    page.keyboard.press("Enter")
    assert "typed without a mouse" in answer(page)


def tab_to(page: Page, selector: str, limit: int = 25) -> None:
    """Press Tab until the element ``selector`` has the focus."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("(selector) => document.activeElement.matches(selector)", selector):
            return
    raise AssertionError(f"{selector} never got the focus in {limit} presses of Tab")


def test_a_phone_shows_everything_without_sideways_scrolling(browsing: Browsing) -> None:
    context = browsing.context(viewport=PHONE)
    page = browsing.page(context)
    new_session(page, browsing.server)
    run(page, "$ echo " + "a-very-long-word-" * 20 + " and-a-path/" * 10)
    answer(page)
    page.locator(".tool-returned summary").click()  # the longest text, opened
    width, view = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= view, f"the page is {width}px wide on a {view}px screen"
    signed_out = browsing.page(browsing.context(signed_in_as=None, viewport=PHONE))
    signed_out.goto(browsing.server.base_url + "/ui/sign-in")
    width, view = signed_out.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= view


def test_switch_between_sessions_and_delete_one(browsing: Browsing) -> None:
    server = browsing.server
    page = browsing.page()
    first = new_session(page, server)
    run(page, "$ echo in the first session")
    answer(page)
    second = new_session(page, server)
    expect(page.locator("#timeline .task")).to_have_count(0)
    sessions = page.get_by_role("navigation", name="Sessions")
    expect(sessions.get_by_role("link", name=second)).to_have_attribute("aria-current", "page")

    sessions.get_by_role("link", name=first).click()
    expect(page).to_have_url(f"{server.base_url}/?session_id={first}")
    assert "in the first session" in answer(page)
    expect(sessions.get_by_role("link", name=first)).to_have_attribute("aria-current", "page")
    expect(page).to_have_title(f"{first} · alex-server")

    page.once("dialog", lambda dialog: dialog.accept())
    sessions.get_by_role("button", name=f"Delete session {first}").click()
    expect(page).to_have_url(f"{server.base_url}/")
    expect(page.get_by_role("heading", name="No session open")).to_be_visible()
    expect(sessions.get_by_role("link", name=first)).to_have_count(0)
    expect(sessions.get_by_role("link", name=second)).to_be_visible()


def test_a_link_on_another_site_opens_the_session(browsing: Browsing) -> None:
    """The browser holds back a SameSite=Strict cookie on a navigation another site starts; the page then asks for
    itself again from its own site, so a signed-in user still lands in the session."""
    server = browsing.server
    context = browsing.context()
    session_id = new_session(browsing.page(context), server)
    elsewhere = browsing.page(context)
    elsewhere.set_content(f'<a href="{server.base_url}/?session_id={session_id}">the session</a>')
    elsewhere.get_by_role("link", name="the session").click()
    expect(elsewhere).to_have_url(f"{server.base_url}/?session_id={session_id}")
    expect(elsewhere.locator("#conn")).to_have_attribute("data-state", "live")
