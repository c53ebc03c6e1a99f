"""A classroom server in a real browser (Debian's chromium + Playwright): two learners in two
browser contexts and the teacher in a third.

A learner picks a name on the first visit and a reload still knows it (the cookie). Each uploads
a file of the same name: neither replaces the other's. Bob does not see Alice's job until he asks
for everyone's runs, and then it is read-only, with no Stop; Alice has a Stop; the teacher, after
the key, stops it from the teacher's page.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.browser_harness import (
    CHROMIUM, CHROMIUM_ARGS, PROJECTOR, REPO, chromium_available, go_to, kill_jobs, open_page, sidebar_text,
    start_server, wait_for_app,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is not installed"),
]

SHARED_DATA = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
                   or REPO.parent / "shared" / "data")
TEACHER_KEY = "chalk-and-talk"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classroom")
    (folder / "checkpoints").mkdir()
    (folder / "data").mkdir()
    return folder


@pytest.fixture(scope="module")
def server(workdir):
    srv = start_server(workdir, {"GLASSBOX_DATA_DIR": str(SHARED_DATA), "GLASSBOX_MAX_JOBS": "1",
                                 "GLASSBOX_CLASSROOM": "1", "GLASSBOX_TEACHER_KEY": TEACHER_KEY})
    yield srv
    srv.stop()
    kill_jobs(workdir / "checkpoints")


def sign_in(page, server, name: str) -> None:
    """The first visit: the name form, as a learner fills it in."""
    open_page(page, server.url)
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Start").click()
    wait_for_app(page)
    from playwright.sync_api import expect

    expect(page.locator('[data-testid="stSidebarUserContent"]').get_by_text(f"You are {name}")).to_be_visible()


def upload(page, tmp_path: Path, text: str) -> None:
    from playwright.sync_api import expect

    go_to(page, "1. Text and tokens")
    path = tmp_path / page.context.learner / "notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    expect(page.get_by_text(re.compile("Using your upload as the corpus"))).to_be_visible()


def test_two_learners_and_the_teacher(server, workdir, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from core.lab import jobs

    monkeypatch.setenv("GLASSBOX_CHECKPOINTS_DIR", str(workdir / "checkpoints"))
    monkeypatch.setenv("GLASSBOX_DOWNLOADS_DIR", str(workdir / "data"))  # where the server keeps the uploads
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = {}
            for name in ("alice", "bob", "mr-k"):
                context = browser.new_context(viewport=PROJECTOR)
                context.learner = name
                pages[name] = context.new_page()
                pages[name].set_default_timeout(60_000)
                sign_in(pages[name], server, name)
            alice, bob, teacher = pages["alice"], pages["bob"], pages["mr-k"]
            bob.reload()  # the cookie remembers him: no name form again
            wait_for_app(bob)
            assert "You are bob" in sidebar_text(bob)

            upload(alice, tmp_path, "Alice's own corpus, long enough for a batch. " * 200)
            upload(bob, tmp_path, "Bob's corpus, a different one. " * 200)
            uploads = workdir / "data" / "uploads"
            assert (uploads / "alice" / "notes.txt").read_text().startswith("Alice's own corpus")
            assert (uploads / "bob" / "notes.txt").read_text().startswith("Bob's corpus")

            jobs.start_job(["pretrain", "--data", "upload:alice/notes.txt", "--tokenizer", "char", "--preset", "tiny",
                            "--minutes", "5", "--run-id", "alice-run", "--quiet"], "alice-run", owner="alice")
            go_to(bob, "4. Pre-training")
            expect(bob.get_by_text("No pre-training run yet")).to_be_visible()
            bob.get_by_text("Show everyone's runs (read-only)").click()
            wait_for_app(bob)
            main = bob.locator('[data-testid="stMain"]')
            expect(main.get_by_text(re.compile(r"alice-run\s*· alice's"))).to_be_visible()
            expect(main.get_by_text("read-only", exact=True)).to_be_visible()
            assert main.get_by_role("button", name="Stop").count() == 0
            assert "alice-run" not in sidebar_text(bob)  # others' jobs are counted, not named
            assert "other learners" in sidebar_text(bob)

            go_to(alice, "4. Pre-training")
            expect(alice.locator('[data-testid="stMain"]').get_by_role("button", name="Stop")).to_be_visible()

            go_to(teacher, "Teacher")
            teacher.get_by_label("Teacher's key").fill(TEACHER_KEY)
            teacher.get_by_label("Teacher's key").press("Enter")
            wait_for_app(teacher)
            expect(teacher.get_by_text("1 · Everyone's progress through the seven stages")).to_be_visible()
            expect(teacher.get_by_label("Teacher's key")).to_have_count(0)
            teacher.locator('[data-testid="stMain"]').get_by_role("button", name="Stop").first.click()
            deadline = time.monotonic() + 60  # the click's rerun may not have begun yet (a loaded machine)
            while jobs.job_state("alice-run").state == "running" and time.monotonic() < deadline:
                time.sleep(0.25)
            assert jobs.job_state("alice-run").state in ("stopping", "stopped")
        finally:
            browser.close()
