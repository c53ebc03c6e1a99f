"""The app shell: every page renders on an empty workspace; core never imports streamlit."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.lab import jobs, runs
from pages._ui import BEYOND, STAGES

REPO = Path(__file__).resolve().parent.parent
PAGE_FILES = ["pages/home.py"] + [s.file for s in STAGES + BEYOND]
STAGE_FILES = [s.file for s in STAGES + BEYOND]  # home is tested through app.py (its links need the navigation)


def test_core_never_imports_streamlit_in_source():
    offenders = []
    for path in (REPO / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "streamlit" or n.startswith("streamlit.") for n in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_core_never_imports_streamlit_at_runtime():
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "core").rglob("*.py")
                     if p.stem not in ("__main__", "__init__"))
    assert len(modules) > 20  # the rooms' modules, not just the package
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert 'streamlit' not in sys.modules, 'streamlit was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_every_stage_has_a_page_file():
    assert [Path(f).exists() for f in PAGE_FILES] == [True] * len(PAGE_FILES)


@pytest.mark.parametrize("page", STAGE_FILES)
def test_page_renders_on_an_empty_workspace(page):
    at = AppTest.from_file(str(REPO / page), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title, "every page starts with a title"


def test_app_navigation_and_sidebar_render():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert "Glass Box LLM" in at.title[0].value  # the home page is the default
    assert any("No job running" in m.value for m in at.sidebar.markdown)
    for stage in STAGES:  # every stage page opens through the navigation
        at.switch_page(stage.file).run()
        assert not at.exception, (stage.file, [e.value for e in at.exception])
        assert f"Stage {stage.number}" in at.title[0].value
    for extra in BEYOND:  # and the pages beyond the seven stages
        at.switch_page(extra.file).run()
        assert not at.exception, (extra.file, [e.value for e in at.exception])
        assert at.title, extra.file


def test_home_shows_stages_machine_and_runs():
    runs.create_run("tok-demo", "tokenizer", {})
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "tok-demo" in text  # stage 1's run, read from disk
    assert text.count("no runs yet") == 5  # stages 3–7 have none
    assert {m.label for m in at.metric} >= {"Device", "Torch threads"}


def test_sidebar_shows_a_running_job():
    import time

    jobs.start_job(["countdown", "--steps", "300", "--delay", "0.05", "--run-id", "side-1"], "side-1")
    deadline = time.monotonic() + 30
    while jobs.job_state("side-1").state != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert any("side-1" in m.value for m in at.sidebar.markdown)
    jobs.stop_job("side-1")
