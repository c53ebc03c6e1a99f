"""The mechanism pages in a real browser (Debian's chromium + Playwright), as a learner clicks them:
the microscope branches a generation, a DPO job draws its curves, a chat has two turns.

Each test writes the small runs it starts from straight into the server's run store (a tiny model
with random weights is enough to exercise every control), then works the page only by clicking.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.browser_harness import (
    CHROMIUM, CHROMIUM_ARGS, PROJECTOR, REPO, act_until, assert_no_exception, choose, chromium_available, element,
    go_to, kill_jobs, open_page, plotly_points, screenshot, screenshot_dir, set_number, start_server, wait_for_app,
    wait_for_more_points,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is not installed"),
]

SHARED_DATA = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
                   or REPO.parent / "shared" / "data")
JOB_WAIT = 600_000  # ms, a busy two-core machine
TOY_TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request. ### Instruction: Name a colour. ### Response: Blue is a colour. " * 20)


@pytest.fixture(scope="module", autouse=True)
def patient_expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mechanism")
    (folder / "checkpoints").mkdir()
    (folder / "data").mkdir()
    return folder


@pytest.fixture(scope="module")
def server(workdir):
    srv = start_server(workdir, {"GLASSBOX_DATA_DIR": str(SHARED_DATA), "GLASSBOX_MAX_JOBS": "1"})
    yield srv
    srv.stop()
    kill_jobs(workdir / "checkpoints")


@pytest.fixture(scope="module")
def tiny_runs(workdir):
    """A pre-trained-shaped run and an instruction-tuned-shaped run (tiny, random weights), on disk."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GLASSBOX_CHECKPOINTS_DIR", str(workdir / "checkpoints"))
    from core.gpt.model import GPT, preset_config
    from core.gpt.tokenizers import train_bpe
    from core.lab import runs
    from core.lab.models import save_model_run

    tokenizer = train_bpe(TOY_TEXT, 300)
    for run_id, stage in (("scope-run", "pretrain"), ("sft-run", "instruct")):
        with runs.quick_run(run_id, stage, {}):
            save_model_run(run_id, GPT(preset_config("tiny", tokenizer.vocab_size, context_length=128)), tokenizer)
    mp.undo()
    return {"pretrain": "scope-run", "instruct": "sft-run"}


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=PROJECTOR)
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        yield tab
        browser.close()


@pytest.fixture
def shots(tmp_path):
    return screenshot_dir(tmp_path)


def test_the_microscope_branches_a_generation_when_a_candidate_is_clicked(server, tiny_runs, page, shots):
    from playwright.sync_api import expect

    open_page(page, server.url)
    go_to(page, "3. The GPT architecture")
    page.get_by_role("radiogroup", name="Model").get_by_text("A run on disk").click()
    wait_for_app(page)
    choose(page, "Run", f"{tiny_runs['pretrain']} — pretrain, finished")
    wait_for_app(page)
    candidate = element(page, "p3_scope_cand_2").get_by_role("button")
    expect(candidate).to_be_visible()
    token = candidate.inner_text().rsplit(" ", 1)[0].replace(" (cut)", "")  # "label 3.1%" → "label"
    clicked = page.locator('span[title^="clicked"]')
    assert clicked.count() == 0
    wait_for_app(page)  # a click that lands mid-redraw can be lost: a person would click again
    act_until(lambda: candidate.click(), clicked.first, timeout=60_000)
    assert clicked.first.inner_text() == token  # the forced token now stands in the text, outlined
    expect(element(page, "p3_scope_cand_0").get_by_role("button")).to_be_visible()  # the next step's candidates
    assert plotly_points(page, "p3_scope_bars") >= 1
    assert_no_exception(page)
    screenshot(page, "microscope", shots)
    wait_for_app(page)
    taken = clicked.count()
    element(page, "p3_scope_back").get_by_role("button").click()
    expect(clicked).to_have_count(taken - 1)  # back: the last branch is undone
    assert_no_exception(page)


def test_a_dpo_job_started_from_the_page_draws_its_curves(server, tiny_runs, page, shots):
    from playwright.sync_api import expect

    open_page(page, server.url)
    go_to(page, "Preference tuning (DPO)")
    choose(page, "Start from (SFT model)", tiny_runs["instruct"])
    set_number(page, "Steps", 6)
    run_id = page.get_by_label("Run name", exact=True).input_value()
    page.get_by_role("button", name="Start preference tuning").click()
    wait_for_more_points(page, f"dpo_loss_{run_id}", 0, JOB_WAIT)  # the live curve appears
    expect(page.get_by_text(re.compile(r"— finished"))).to_be_visible(timeout=JOB_WAIT)
    wait_for_app(page)
    assert plotly_points(page, f"dpo_loss_{run_id}") >= 2
    assert plotly_points(page, f"dpo_reward_{run_id}") >= 2
    assert_no_exception(page)
    screenshot(page, "preference", shots)


def test_a_two_turn_conversation_in_the_chat_page(server, tiny_runs, page, shots):
    from playwright.sync_api import expect

    open_page(page, server.url)
    go_to(page, "Chat with your model")
    choose(page, "Model", tiny_runs["instruct"])
    wait_for_app(page)
    box = page.get_by_placeholder("Ask the model…")
    for turn, question in enumerate(("Name a colour.", "And another one?"), start=1):
        box.fill(question)
        box.press("Enter")
        user = page.locator('[data-testid="stChatMessage"]').filter(has_text=question)
        expect(user).to_have_count(1)
        expect(page.locator('[data-testid="stChatMessage"]')).to_have_count(2 * turn, timeout=JOB_WAIT)
        wait_for_app(page)
    page.get_by_text("Show the prompt the model read").click()
    wait_for_app(page)
    expect(page.get_by_text("Name a colour.").first).to_be_visible()
    assert_no_exception(page)
    screenshot(page, "chat", shots)
