"""Shared test fixtures: every test gets its own empty checkpoints and downloads folders.

Data files are found through GLASSBOX_DATA_DIR (CI sets it to ../shared/data); tests never
write into the repository's data/ or checkpoints/.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GLASSBOX_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def isolated_workspace(tmp_path, monkeypatch):
    """Empty checkpoints/ and data/ per test; shared data sets found by file name."""
    checkpoints = tmp_path / "checkpoints"
    downloads = tmp_path / "data"
    checkpoints.mkdir()
    downloads.mkdir()
    monkeypatch.setenv("GLASSBOX_CHECKPOINTS_DIR", str(checkpoints))
    monkeypatch.setenv("GLASSBOX_DOWNLOADS_DIR", str(downloads))
    monkeypatch.setenv("GLASSBOX_DATA_DIR", str(SHARED_DATA))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # Every test's stand-in judge listens on 127.0.0.1; the refusal tests delete this again.
    monkeypatch.setenv("GLASSBOX_JUDGE_ALLOW_HOSTS", "loopback")
    for name in ("GLASSBOX_JUDGE_ENDPOINTS", "GLASSBOX_JUDGE_KEY_URL", "GLASSBOX_JUDGE_API_KEY",
                 "GLASSBOX_CLASSROOM", "GLASSBOX_TEACHER_KEY", "GLASSBOX_SETTINGS", "GLASSBOX_MAX_JOBS_PER_LEARNER"):
        monkeypatch.delenv(name, raising=False)
    _clear_streamlit_caches()
    yield {"checkpoints": checkpoints, "downloads": downloads, "shared": SHARED_DATA}
    _stop_leftover_jobs(checkpoints)


def _clear_streamlit_caches():
    # st.cache_resource / cache_data are shared across AppTest instances in one process.
    try:
        import streamlit as st
    except ImportError:
        return
    st.cache_data.clear()
    st.cache_resource.clear()


def _stop_leftover_jobs(checkpoints: Path):
    """Kill any background job a test left running, so it cannot outlive the test."""
    import signal

    from core.lab import jobs

    for status in checkpoints.glob("*/status.json"):
        try:
            state = jobs.job_state(status.parent.name)
            if state.active and state.alive and state.pid:
                os.killpg(state.pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data folder not present")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models on a loaded 2-core machine: one thread (what generation_threads does for them)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    """How often a browser test's wait gave up on the page settling (tests/browser_harness.wait_for_app)."""
    from tests import browser_harness

    if browser_harness.UNSETTLED:
        terminalreporter.write_line(f"browser: {len(browser_harness.UNSETTLED)} waits gave up settling after "
                                    f"{browser_harness.SETTLE_TIMEOUT_MS} ms: {sorted(set(browser_harness.UNSETTLED))}")
