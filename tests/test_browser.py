"""The app in a real browser (Debian's Chromium driven by Playwright), at projector size.

Run with GLASSBOX_SCREENSHOTS=docs to refresh the screenshots in docs/ used by the README.
"""

from __future__ import annotations

import pytest

from tests.browser_harness import (
    PROJECTOR, CHROMIUM, CHROMIUM_ARGS, assert_no_exception, chromium_available,
    horizontal_overflow, kill_jobs, screenshot, screenshot_dir, start_server, wait_for_app,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is not installed"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def server(workdir):
    (workdir / "checkpoints").mkdir(exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    srv = start_server(workdir)
    yield srv
    srv.stop()
    kill_jobs(workdir / "checkpoints")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=PROJECTOR)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def test_home_page_in_a_real_browser(server, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(server.url)
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Glass Box LLM").first).to_be_visible()
    expect(page.get_by_text("The path")).to_be_visible()
    expect(page.get_by_text("No job running")).to_be_visible()  # sidebar
    assert_no_exception(page)
    assert horizontal_overflow(page) <= 0
    screenshot(page, "home", screenshot_dir(tmp_path))
