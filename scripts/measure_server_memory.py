"""Does the Streamlit server's memory stay flat while a learner watches a training run?

Live charts that are rebuilt every second can leak: each rerun leaves another chart behind in the
session, and after ten minutes the server holds gigabytes. This script reproduces that situation
and measures it:

1. starts `streamlit run app.py` headless on a free 127.0.0.1 port, with its own temporary
   checkpoints folder (nothing is written into the repository);
2. starts a pre-training job (`small` preset on Tiny Shakespeare characters by default);
3. opens the stage-4 page in a real headless browser (Debian's chromium through Playwright), which
   keeps polling the live loss chart for the whole time;
4. samples the server process's resident memory (VmRSS from /proc) every few seconds;
5. prints the samples as it goes and, as its last line, one JSON object:
   `max_rss_mb`, `start_rss_mb`, `warm_rss_mb` (a minute in), `end_rss_mb`, `growth_mb` (end − warm),
   `minutes`, `ok` (max < 1 GB).

    python scripts/measure_server_memory.py                 # 10 minutes, the target's setting
    python scripts/measure_server_memory.py --minutes 1     # a quick look
    python scripts/measure_server_memory.py --no-browser    # the server alone (no live page)

Needs: the `chromium` package at /usr/bin/chromium and Python's `playwright` (never run
`playwright install`: it downloads a browser). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_MB = 1024
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of one process in MiB (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_rss_mb(pid: int) -> float | None:
    """RSS of the server and any children it started (a page may start jobs of its own)."""
    total = rss_mb(pid)
    if total is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += tree_rss_mb(int(child)) or 0.0
    return total


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    url = f"http://127.0.0.1:{port}/_stcore/health"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"streamlit was not healthy after {timeout_s:.0f} s")


def start_server(port: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port),
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    log = open(Path(env["GLASSBOX_CHECKPOINTS_DIR"]).parent / "streamlit.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to watch (default 10)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", default="tinyshakespeare", help="corpus (python-docs is always there)")
    parser.add_argument("--page", default="Pretraining", help="URL path of the page to keep open")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="glassbox-memory-"))
    env = dict(os.environ)
    env.update({
        "GLASSBOX_CHECKPOINTS_DIR": str(workdir / "checkpoints"),
        "GLASSBOX_DOWNLOADS_DIR": str(workdir / "data"),
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p),
    })
    shared = REPO.parent / "shared" / "data"
    if not env.get("GLASSBOX_DATA_DIR") and shared.is_dir():
        env["GLASSBOX_DATA_DIR"] = str(shared)
    for name in ("checkpoints", "data"):
        (workdir / name).mkdir()
    os.environ.update(env)  # this process starts the job: same run store as the server
    sys.path.insert(0, str(REPO))
    from core.lab import data, jobs

    data_name = args.data if data.find(args.data) is not None else "python-docs"
    port = free_port()
    server = start_server(port, env)
    run_id = "memory-watch"
    samples: list[tuple[float, float]] = []
    browser_note = "no browser"
    page_changes, last_text = 0, None
    try:
        wait_healthy(port, server)
        minutes_of_training = args.minutes + 2  # keeps training for the whole watch
        jobs.start_job(["pretrain", "--data", data_name, "--tokenizer", "char", "--preset", args.preset,
                        "--minutes", str(minutes_of_training), "--run-id", run_id], run_id)
        print(f"server pid {server.pid} on port {port}; job {run_id} on {data_name}; "
              f"watching {args.minutes} min", file=sys.stderr, flush=True)
        with _browser(args, port) as page:
            if page is not None:
                browser_note = f"chromium on /{args.page}"
            start = time.time()
            while time.time() - start < args.minutes * 60:
                value = tree_rss_mb(server.pid)
                if value is None:
                    raise SystemExit("the streamlit server died")
                elapsed = time.time() - start
                samples.append((elapsed, value))
                state = jobs.job_state(run_id).state
                if page is not None:  # is the page live? its visible text changes as training goes
                    text = page.inner_text("body")
                    page_changes += text != last_text
                    last_text = text
                print(f"{elapsed:7.0f} s  server RSS {value:7.1f} MiB  job {state}", file=sys.stderr, flush=True)
                if page is not None:
                    page.wait_for_timeout(args.interval * 1000)  # the page keeps updating meanwhile
                else:
                    time.sleep(args.interval)
            seen = page is not None and run_id in page.content()
    finally:
        try:
            jobs.stop_job(run_id, force=True)
        except Exception:  # noqa: BLE001 - the job may never have started
            pass
        stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)

    values = [v for _, v in samples]
    # Growth is counted from the first sample a minute in (or halfway): by then the page has
    # imported torch, plotly and core, which is a one-off cost and not a leak.
    warm_after = min(60.0, args.minutes * 30)
    warm = next((v for t, v in samples if t >= warm_after), values[-1])
    result = {
        "max_rss_mb": round(max(values), 1), "start_rss_mb": round(values[0], 1),
        "warm_rss_mb": round(warm, 1), "end_rss_mb": round(values[-1], 1),
        "growth_mb": round(values[-1] - warm, 1),
        "samples": len(values), "minutes": args.minutes, "target_mb": TARGET_MB,
        "ok": max(values) < TARGET_MB, "browser": browser_note, "run_seen_on_page": seen,
        "page_changes": page_changes,
        "preset": args.preset, "data": data_name,
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


class _browser:
    """A headless chromium page on the app (or None with --no-browser)."""

    def __init__(self, args, port: int):
        self.args, self.port = args, port
        self.playwright = self.browser = None

    def __enter__(self):
        if self.args.no_browser:
            return None
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                       headless=True)
        page = self.browser.new_page()
        page.goto(f"http://127.0.0.1:{self.port}/{self.args.page}", wait_until="domcontentloaded")
        page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
        return page

    def __exit__(self, *exc):
        if self.browser is not None:
            self.browser.close()
        if self.playwright is not None:
            self.playwright.stop()
        return False


if __name__ == "__main__":
    sys.exit(main())
