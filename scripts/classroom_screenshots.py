"""The README's screenshots of the teacher's page and a report card, from real runs.

It makes a temporary classroom run store: two learners each pre-train `small` for one minute on
Tiny Shakespeare characters (real runs, `python -m core pretrain`), and one fine-tunes a spam
classifier from hers for 40 steps; their owners are recorded as the app records them. Then it starts
the app as a classroom server, signs in as the teacher in headless Chromium, and writes
docs/teacher.png (the teacher's page, leaderboard at 1 minute) and docs/report-card.png (the
report card the page downloads, opened in the browser). About 4 minutes on 2 cores.

    python scripts/classroom_screenshots.py
    python scripts/classroom_screenshots.py --reuse /tmp/glassbox-shots-XXXX   # the runs of a previous go
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser_harness import CHROMIUM, CHROMIUM_ARGS, go_to, kill_jobs, start_server, wait_for_app  # noqa: E402

KEY = "screenshot-key"


def core(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, check=True, env=os.environ,
                   stdout=subprocess.DEVNULL)


def make_runs() -> None:
    from core.lab import learners

    for name, seed in (("ada", "1"), ("grace", "2")):
        core("pretrain", "--data", "tinyshakespeare", "--tokenizer", "char", "--preset", "small", "--minutes", "1",
             "--seed", seed, "--run-id", f"{name}-pretrain")
        learners.set_owner(f"{name}-pretrain", name)
    core("classify", "--from", "ada-pretrain", "--data", "sms-spam", "--steps", "40", "--run-id", "ada-spam")
    learners.set_owner("ada-spam", "ada")


def main() -> int:
    from playwright.sync_api import sync_playwright

    reuse = sys.argv[2] if sys.argv[1:2] == ["--reuse"] else None
    workdir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix="glassbox-shots-"))
    for sub in ("checkpoints", "data"):
        (workdir / sub).mkdir(exist_ok=True)
    os.environ.update({"GLASSBOX_CHECKPOINTS_DIR": str(workdir / "checkpoints"),
                       "GLASSBOX_DOWNLOADS_DIR": str(workdir / "data")})
    if not reuse:
        make_runs()
    server = start_server(workdir, {"GLASSBOX_CLASSROOM": "1", "GLASSBOX_TEACHER_KEY": KEY,
                                    "GLASSBOX_LEADERBOARD_MINUTES": "1"})
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1500})  # the page's main scrolls itself
            page.set_default_timeout(120_000)
            page.goto(f"{server.url}/?learner=mr-k")
            wait_for_app(page)
            go_to(page, "Teacher")
            page.get_by_label("Teacher's key").fill(KEY)
            page.get_by_label("Teacher's key").press("Enter")
            wait_for_app(page)
            page.get_by_text("3 · Leaderboard at a fixed budget").wait_for()
            page.locator('[data-testid="stSidebarNav"]').get_by_text("1. Text and tokens").wait_for()
            wait_for_app(page)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(REPO / "docs" / "teacher.png"), full_page=True)
            from core.lab import classroom

            card = workdir / "card.html"
            card.write_text(classroom.report_card("ada"))
            page.goto(card.as_uri())
            page.screenshot(path=str(REPO / "docs" / "report-card.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
        kill_jobs(workdir / "checkpoints")
    print("wrote docs/teacher.png and docs/report-card.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
