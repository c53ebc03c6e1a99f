"""Helpers for the end-to-end tests: a real `streamlit run app.py` and Debian's Chromium.

Never `playwright install` (it downloads a browser and fails offline): Playwright drives the
system Chromium at /usr/bin/chromium with flags that keep it off the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PROJECTOR = {"width": 1280, "height": 720}


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    env: dict
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(workdir: Path, extra_env: dict | None = None, port: int | None = None) -> Server:
    """Start the app on a free loopback port with its own checkpoints/ and data/ folders."""
    port = port or free_port()
    env = dict(os.environ)
    env.update({
        "GLASSBOX_CHECKPOINTS_DIR": str(workdir / "checkpoints"),
        "GLASSBOX_DOWNLOADS_DIR": str(workdir / "data"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    log = workdir / f"streamlit-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return Server(url, process, env, log)
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("streamlit did not become healthy in 60 s")


def kill_jobs(checkpoints: Path) -> None:
    """Stop background jobs a test left behind (they run in their own process sessions)."""
    import json

    for status in checkpoints.glob("*/status.json"):
        try:
            info = json.loads(status.read_text())
            if info.get("state") in ("queued", "running", "stopping") and info.get("pid"):
                os.killpg(info["pid"], signal.SIGKILL)
        except (OSError, ValueError):
            pass


def wait_for_app(page, timeout: float = 60_000) -> None:
    """Wait until Streamlit has finished running the script (no 'Running…' indicator)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')""", timeout=timeout)


def assert_no_exception(page) -> None:
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


def horizontal_overflow(page) -> int:
    """How many pixels the page scrolls sideways (0 on a projector-friendly layout)."""
    return page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


def screenshot(page, name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def screenshot_dir(tmp_path: Path) -> Path:
    """Screenshots go to a temporary folder, or to docs/ when GLASSBOX_SCREENSHOTS=docs."""
    return REPO / "docs" if os.environ.get("GLASSBOX_SCREENSHOTS") == "docs" else tmp_path / "shots"
