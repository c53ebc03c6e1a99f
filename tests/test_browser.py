"""The app in a real browser (Debian's Chromium driven by Playwright), at projector size.

What a learner does, end to end, through the page's own controls: stages 1 → 7 with the smallest
settings, a reload and a trip to another page in the middle of pre-training, two students at once
sharing one job slot, every page at 1280×720, and a first visit with no data at all.

Run with GLASSBOX_SCREENSHOTS=docs to refresh the screenshots in docs/ used by the README.
The stage-7 judge is a scripted OpenAI-compatible server on 127.0.0.1 (tests/fake_openai_server.py).
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from pathlib import Path

import pytest

from tests.browser_harness import (
    CHROMIUM, CHROMIUM_ARGS, PROJECTOR, REPO, act_until, assert_no_exception, bring_to_top, charts_on_screen,
    chart_box, choose, chromium_available, close_page_not_found, dataframe, dataframe_rows, element, go_to,
    horizontal_overflow, kill_jobs, metric_value, open_page, plotly_chart_with, plotly_points, plotly_points_in,
    screenshot, screenshot_dir,
    set_number, set_slider_to_minimum, start_server, vega_chart, vega_marks, wait_for_app, wait_for_more_points,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is not installed"),
]

SHARED_DATA = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
                   or REPO.parent / "shared" / "data")
STAGES = ["1. Text and tokens", "2. Attention", "3. The GPT architecture", "4. Pre-training",
          "5. Classification fine-tuning", "6. Instruction fine-tuning", "7. LLM-judge evaluation"]
JOB_WAIT = 600_000  # ms: long jobs on a busy two-core machine; an idle one needs a fraction


@pytest.fixture(scope="module", autouse=True)
def patient_expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # Streamlit pages that import torch take seconds to draw


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def server(workdir):
    import os

    (workdir / "checkpoints").mkdir(exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    data_dir = os.environ.get("GLASSBOX_DATA_DIR") or str(SHARED_DATA)
    # The scripted judge listens on loopback, which a shared server refuses unless allowed.
    srv = start_server(workdir, {"GLASSBOX_DATA_DIR": data_dir, "GLASSBOX_MAX_JOBS": "1",
                                 "GLASSBOX_JUDGE_ALLOW_HOSTS": "loopback"})
    yield srv
    srv.stop()
    kill_jobs(workdir / "checkpoints")


@pytest.fixture(scope="module")
def judge():
    from tests.fake_openai_server import FakeOpenAIServer, default_responder

    def varied_scores(body: dict):
        """A judge with opinions: each answer gets its own (deterministic) score, so the charts show a spread."""
        text = json.dumps(body.get("messages", []))
        if "Response A" in text:
            return default_responder(body)
        score = 15 + zlib.crc32(text.encode()) % 80
        return json.dumps({"criteria": {"correctness": 1 + score // 25, "instruction_following": 1 + score // 25,
                                        "completeness": 1 + score // 30, "concision": 3},
                           "score": score, "rationale": f"Scored {score}: scripted by the test."})

    with FakeOpenAIServer(models=("judge-model",), responder=varied_scores) as fake:
        yield fake


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


@pytest.fixture
def shots(tmp_path):
    return screenshot_dir(tmp_path)


# ------------------------------------------------------------------------------------------ home


def test_home_page_in_a_real_browser(server, page, shots):
    from playwright.sync_api import expect

    open_page(page, server.url)
    expect(page.get_by_role("heading", name="Glass Box LLM").first).to_be_visible()
    expect(page.get_by_text("The path")).to_be_visible()
    expect(page.get_by_text("No job running")).to_be_visible()  # sidebar
    for stage in STAGES:
        expect(page.locator('[data-testid="stMain"]').get_by_role("link", name=stage)).to_be_visible()
    assert_no_exception(page)
    assert horizontal_overflow(page) <= 0
    screenshot(page, "home", shots)


# ------------------------------------------------------------------------------ the seven stages


def start_and_watch(page, button: str, live_section: str, what: str, problems: list[str]) -> None:
    """Click a page's start button; the page should switch to watching the new job by itself.

    If it does not, the problem is recorded (the test fails at the end) and we do what a person
    would do — open another page and come back — so the rest of the walk is still checked."""
    from playwright.sync_api import expect

    page.get_by_role("button", name=button).click()
    try:
        expect(page.get_by_text(live_section)).to_be_visible(timeout=20_000)
    except AssertionError:
        problems.append(
            f"{what}: 20 s after '{button}' the page still did not show '{live_section}': the learner "
            "sees no sign of the job they started until they leave the page and come back.")
        go_to(page, "Home")
        go_to(page, STAGES[int(what.split()[-1]) - 1])
        expect(page.get_by_text(live_section)).to_be_visible()


@pytest.mark.timeout(1800)
def test_the_seven_stages_in_order(server, judge, page, shots, workdir):
    """A learner's first session: every stage with its smallest settings, as a person clicks it."""
    try:
        walk_the_seven_stages(server, judge, page, shots, workdir)
    except Exception:
        page.screenshot(path=str(workdir / "failure.png"))  # what the learner saw when it went wrong
        raise


def walk_the_seven_stages(server, judge, page, shots, workdir):
    from playwright.sync_api import expect

    timings, problems = {}, []
    clock = time.monotonic()

    def lap(name):
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 1)
        clock = now

    open_page(page, server.url)
    lap("home")

    # -- 1. A byte-pair tokeniser trained on the built-in corpus, the smallest vocabulary first.
    go_to(page, STAGES[0])
    expect(page.get_by_text(re.compile(r"Trained: [\d,]+ tokens"))).to_be_visible()
    set_slider_to_minimum(page, "Vocabulary size")
    expect(page.get_by_text("Trained: 257 tokens (0 merges)")).to_be_visible()
    page.get_by_role("slider", name="Vocabulary size").press("PageUp")  # a few merges more
    expect(page.get_by_text(re.compile(r"Trained: (2[6-9]\d|[3-9]\d\d) tokens"))).to_be_visible()
    merges = dataframe(page, "new token")
    assert dataframe_rows(merges) > 0, "the table of first merges is empty"
    assert plotly_points_in(plotly_chart_with(page, "characters per token")) >= 1  # the compression curve
    page.get_by_role("button", name="Save tokeniser").click()
    expect(page.get_by_text("Saved Our BPE as run")).to_be_visible()
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="2. Train a byte-pair encoder"))
    screenshot(page, "stage-1", shots)
    lap("stage 1: tokeniser")

    # -- 2. Attention by hand: every step a table and a heatmap.
    go_to(page, STAGES[1])
    weights = element(page, "toy_weights")
    weights.scroll_into_view_if_needed()
    expect(weights.locator(".js-plotly-plot").first).to_be_visible()
    assert plotly_points(page, "toy_weights") == 6  # six words, six rows of weights
    before = page.locator('[data-testid="stDataFrame"]').nth(0).inner_text()
    page.get_by_text("Causal mask (hide future words)").click()
    expect(page.get_by_text("4 · Causal mask").first).to_be_visible()
    expect(element(page, "toy_masked").locator(".js-plotly-plot").first).to_be_visible()
    assert page.locator('[data-testid="stDataFrame"]').nth(0).inner_text() == before  # X did not change
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name=re.compile("5 · Weights")))
    screenshot(page, "stage-2", shots)
    lap("stage 2: attention")

    # -- 3. The architecture: the tiny preset, its parameter count and the forward trace.
    go_to(page, STAGES[2])
    page.get_by_role("button", name="tiny", exact=True).click()
    trace = dataframe(page, "output shape")
    expect(trace).to_be_visible()
    assert dataframe_rows(trace) >= 10, "the forward trace lists too few modules"
    assert int(metric_value(page, "Parameters").replace(",", "")) > 50_000
    assert plotly_points(page, "trace_logits") == 10  # top-10 next-token scores
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="2. Follow one input through the model"))
    screenshot(page, "stage-3", shots)
    lap("stage 3: architecture")

    # -- 4. Pre-training the tiny preset on characters; the curve grows across a trip away and a reload.
    go_to(page, STAGES[3])
    act_until(lambda: choose(page, "Model preset", "tiny"), page.get_by_text("tiny: 2 blocks"))
    wait_for_app(page)
    page.get_by_text("Training settings").click()
    # A minute of training whatever the machine's speed: time to leave the page and come back.
    for label, value in (("Minutes", 1.0), ("Validation loss every … steps", 20), ("Text sample every … steps", 20)):
        set_number(page, label, value)
    start_and_watch(page, "Start training", "2 · Watch it learn", "Stage 4", problems)
    chart = element(page, "pt_loss_chart")
    expect(chart.locator(".js-plotly-plot").first).to_be_visible(timeout=JOB_WAIT)
    first_look = plotly_points(page, "pt_loss_chart")
    first_step = int(metric_value(page, "step").replace(",", ""))
    lap("stage 4: first point")

    # The time slider, dragged while the job trains: back to step 0 and the untrained model's text.
    slider = page.get_by_role("slider", name="Training step")
    expect(slider).to_be_attached(timeout=JOB_WAIT)  # once two snapshots (steps 0 and 10) exist
    slider.scroll_into_view_if_needed()
    slider.focus()
    slider.press("Home")
    expect(page.get_by_text("Sample at step 0:")).to_be_visible()
    assert jobs_running(workdir), "the job had already finished: the slider was not dragged during training"
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="Travel back in time"))
    screenshot(page, "history", shots)
    lap("stage 4: the time slider while training")

    go_to(page, "Home")  # away, while the job runs: the sidebar still shows it
    expect(page.locator('[data-testid="stSidebarUserContent"]').get_by_text("pretrain ·")).to_be_visible()
    go_to(page, STAGES[3])  # and back: the page finds its job again
    expect(element(page, "pt_loss_chart").locator(".js-plotly-plot").first).to_be_visible()
    second_look = wait_for_more_points(page, "pt_loss_chart", first_look, JOB_WAIT)

    page.reload()
    wait_for_app(page)
    deep_link_dialog = close_page_not_found(page)
    expect(element(page, "pt_loss_chart").locator(".js-plotly-plot").first).to_be_visible()
    expect(page.get_by_text(re.compile(r"— finished"))).to_be_visible(timeout=JOB_WAIT)
    wait_for_app(page)
    final_look = plotly_points(page, "pt_loss_chart")
    final_step = int(metric_value(page, "step").replace(",", ""))
    assert first_look < second_look <= final_look, (first_look, second_look, final_look)
    assert first_step < final_step
    assert metric_value(page, "val loss") != "—"
    samples = dataframe(page, "sample (newest first)")
    assert dataframe_rows(samples) >= 2, "no text samples were shown"
    assert_no_exception(page)
    box = chart_box(chart)
    assert box["width"] >= 700 and box["height"] >= 300, box  # readable from the back of the room
    bring_to_top(page.get_by_role("heading", name="2 · Watch it learn"))
    screenshot(page, "stage-4", shots)
    lap("stage 4: a minute of training")

    # -- 5. Classification: ten steps from the tiny model; accuracy, confusion matrix.
    go_to(page, STAGES[4])
    assert metric_value(page, "spam (raw)") == "747"
    form = page.locator('[data-testid="stForm"]').first
    act_until(lambda: form.get_by_role("radiogroup", name="Budget").get_by_text("steps").click(),
              form.get_by_label("How many", exact=True))
    amount = form.get_by_label("How many", exact=True)
    amount.fill("10")
    amount.press("Tab")
    start_and_watch(page, "Start fine-tuning", "3 · Watch it learn", "Stage 5", problems)
    expect(page.get_by_role("heading", name="4 · How well does it do?")).to_be_visible(timeout=JOB_WAIT)
    accuracy = metric_value(page, "test accuracy")
    assert re.fullmatch(r"\d+\.\d%", accuracy), accuracy
    assert metric_value(page, "steps") == "10"
    expect(element(page, "classify_confusion").locator(".js-plotly-plot").first).to_be_visible()
    assert element(page, "classify_confusion").locator(".js-plotly-plot").evaluate(
        "el => el.calcdata[0][0].z.flat().length") == 4  # the 2×2 confusion matrix
    assert plotly_points(page, "classify_loss_chart") >= 2  # a curve with points
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="3 · Watch it learn"))
    screenshot(page, "stage-5", shots)
    lap("stage 5: classification")

    # -- 6. Instruction tuning for half a minute; five test instructions side by side.
    go_to(page, STAGES[5])
    assert int(metric_value(page, "train records")) > 500
    set_slider_to_minimum(page, "Minutes of tuning")
    compare = page.get_by_label("Test instructions to compare", exact=True)
    compare.fill("5")
    compare.press("Tab")
    start_and_watch(page, "Start tuning", "3 · Watch it learn the format", "Stage 6", problems)
    expect(page.get_by_role("heading", name="Test instructions, side by side")).to_be_visible(timeout=JOB_WAIT)
    table = page.locator('[data-testid="stMarkdownContainer"] table').filter(has_text="instruction-tuned").first
    expect(table).to_be_visible()
    assert table.locator("tr").count() == 1 + 5  # header + five instructions
    assert table.locator("tr").nth(1).locator("td").count() == 5
    assert re.fullmatch(r"\d+%", metric_value(page, "Pre-trained → instruction-tuned"))
    assert plotly_points(page, "instruct_loss_chart") >= 2
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="3 · Watch it learn the format"))
    screenshot(page, "stage-6", shots)
    lap("stage 6: instructions")

    # -- 7. The judge: a scripted OpenAI-compatible server on loopback grades five pairs of answers.
    go_to(page, STAGES[6])
    choose(page, "Preset", "Custom")
    wait_for_app(page)
    for label, value in (("Base URL", judge.url), ("Judge model", "judge-model")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        wait_for_app(page)
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator('[data-testid="stAlertContentSuccess"]').first).to_be_visible()
    page.get_by_role("radiogroup", name="Mode").get_by_text("single").click()
    wait_for_app(page)
    set_number(page, "Instructions to judge", 5)
    page.get_by_role("button", name="Start judging").click()
    expect(page.get_by_role("heading", name="Every judgement")).to_be_visible(timeout=JOB_WAIT)
    assert len(judge.chat_requests) >= 10  # 5 instructions × (pre-trained, tuned)
    assert re.fullmatch(r"\d+\.\d", metric_value(page, "tuned: mean judge score"))
    assert plotly_points(page, "judge_hist") >= 1
    assert dataframe_rows(dataframe(page, "rationale")) == 10
    assert_no_exception(page)
    bring_to_top(page.get_by_role("heading", name="4. Results"))
    screenshot(page, "stage-7", shots)
    lap("stage 7: judge")

    (workdir / "timings.json").write_text(json.dumps({**timings, "deep_link_dialog": deep_link_dialog}))
    print("\nbrowser walk-through, seconds per step:", json.dumps(timings))
    assert horizontal_overflow(page) <= 0
    assert not problems, "\n".join(problems)


def jobs_running(workdir) -> bool:
    """Whether a job in the server's checkpoints folder is still running (its status file says so)."""
    for status in (workdir / "checkpoints").glob("*/status.json"):
        try:
            if json.loads(status.read_text()).get("state") == "running":
                return True
        except (OSError, ValueError):
            pass
    return False


# ------------------------------------------------------------------------------ two students


def set_up_tiny_run(page, minutes: float | None = None, steps: int | None = None) -> str:
    """Stage 4 with the tiny preset and a time or step budget; returns the run name the page proposes."""
    act_until(lambda: choose(page, "Model preset", "tiny"), page.get_by_text("tiny: 2 blocks"))
    wait_for_app(page)
    page.get_by_text("Training settings").click()
    if steps is not None:
        act_until(lambda: page.get_by_role("radiogroup", name="Budget").get_by_text("steps").click(),
                  page.get_by_label("Steps", exact=True))
        set_number(page, "Steps", steps)
    else:
        set_number(page, "Minutes", minutes)
    from playwright.sync_api import expect

    box = page.get_by_label("Run name", exact=True)
    expect(box).to_have_value(re.compile(r"\S"))  # mid-rerun the box can read "" (seen once, under load)
    return box.input_value()


@pytest.mark.timeout(900)
def test_two_students_share_the_runs_and_queue_for_the_job_slot(server, browser, workdir, monkeypatch):
    """Student A trains, student B browses and then asks for a second training: with one job slot
    (GLASSBOX_MAX_JOBS=1) B's job waits, and both students see it waiting."""
    from playwright.sync_api import expect

    from core.lab import jobs

    monkeypatch.setenv("GLASSBOX_CHECKPOINTS_DIR", str(workdir / "checkpoints"))
    students = [browser.new_context(viewport=PROJECTOR) for _ in range(2)]
    try:
        a, b = (context.new_page() for context in students)
        for p in (a, b):
            p.set_default_timeout(60_000)
            open_page(p, server.url)

        go_to(a, STAGES[3])
        run_a = set_up_tiny_run(a, minutes=3)  # still running when B asks, on any machine; stopped below
        a.get_by_role("button", name="Start training").click()
        sidebar_a = a.locator('[data-testid="stSidebarUserContent"]')
        expect(sidebar_a.get_by_text(f"{run_a} · pretrain · running")).to_be_visible(timeout=JOB_WAIT)

        # B browses: the home page (opened afresh once A's run is on disk) lists A's running job.
        config = workdir / "checkpoints" / run_a / "config.json"
        deadline = time.monotonic() + JOB_WAIT / 1000
        while not config.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        b.reload()
        wait_for_app(b)
        sidebar_b = b.locator('[data-testid="stSidebarUserContent"]')
        expect(sidebar_b.get_by_text(f"{run_a} · pretrain · running")).to_be_visible()
        expect(b.get_by_text(f"running: {run_a}")).to_be_visible()
        go_to(a, "Home")
        expect(a.get_by_text(f"running: {run_a}")).to_be_visible()
        path_a = a.locator('[data-testid="stMain"]').get_by_text(re.compile("run\\(s\\)|running:|no runs yet")).all_inner_texts()
        path_b = b.locator('[data-testid="stMain"]').get_by_text(re.compile("run\\(s\\)|running:|no runs yet")).all_inner_texts()
        assert path_a == path_b and path_a, (path_a, path_b)  # the same runs, stage by stage

        # B asks for a second training: it is queued, and every page's sidebar says why.
        go_to(b, STAGES[3])
        run_b = set_up_tiny_run(b, steps=20)
        b.get_by_role("button", name="Start training").click()
        queued = f"{run_b} · pretrain · queued"
        expect(sidebar_b.get_by_text(queued)).to_be_visible()
        expect(sidebar_b.get_by_text(re.compile(r"Queued: waiting for a free slot.*GLASSBOX_MAX_JOBS"))).to_be_visible()
        expect(sidebar_a.get_by_text(queued)).to_be_visible()  # A sees B waiting too
        assert jobs.job_state(run_b).state == "queued"
        assert jobs.job_state(run_a).state == "running"
        screenshot(b, "two-students-queued", workdir / "shots")  # not for the README

        # Clean up: B's job leaves the queue, A stops theirs with the page's Stop button.
        jobs.stop_job(run_b)
        expect(sidebar_b.get_by_text(queued)).to_be_hidden(timeout=JOB_WAIT)
        go_to(a, STAGES[3])
        if not a.get_by_text(f"{run_a} — running").count():  # the page may show an older run
            box = a.get_by_role("combobox", name="Run", exact=True)
            box.click()
            box.press_sequentially(run_a)
            box.press("Enter")
            expect(a.get_by_text(f"{run_a} — running")).to_be_visible()
        a.get_by_role("button", name="Stop").first.click()
        expect(sidebar_a.get_by_text("No job running.")).to_be_visible(timeout=JOB_WAIT)
        for run_id in (run_a, run_b):
            state = jobs.job_state(run_id)
            assert state.state == "stopped", (run_id, state.state, state.error, state.log_tail[-2000:])
    finally:
        for context in students:
            context.close()


# ------------------------------------------------------------------------------ the projector


def scroll_through(page) -> None:
    """Scroll down the whole page and back, so charts drawn on demand are drawn."""
    page.evaluate("""async () => {
        const main = document.querySelector('[data-testid="stMain"]') || document.scrollingElement;
        for (let y = 0; y <= main.scrollHeight; y += 500) { main.scrollTo(0, y); await new Promise(r => setTimeout(r, 120)); }
        main.scrollTo(0, 0);
    }""")


@pytest.mark.timeout(600)
def test_every_page_fits_a_projector(server, page):
    """1280×720: no sideways scrolling on any page, and charts big enough to read."""
    open_page(page, server.url)
    problems = []
    for label in ["Home", *STAGES]:
        go_to(page, label)
        scroll_through(page)
        page.wait_for_timeout(800)
        assert_no_exception(page)
        if (overflow := horizontal_overflow(page)) > 0:
            problems.append(f"{label}: scrolls {overflow}px sideways")
        content = page.locator('[data-testid="stMainBlockContainer"]').bounding_box()
        if content["width"] < 800:
            problems.append(f"{label}: the content is only {content['width']:.0f}px wide")
        for chart in charts_on_screen(page):
            # A third of the content width is the smallest chart that still reads from the back row.
            if chart["width"] and (chart["width"] < 250 or chart["height"] < 180):
                problems.append(f"{label}: a {chart['kind']} is only {chart['width']:.0f}×{chart['height']:.0f}px")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ a first visit


@pytest.mark.timeout(600)
def test_first_visit_without_data_never_blocks(browser, tmp_path):
    """No data downloaded, no internet, no runs: every page renders and says what to do next."""
    from playwright.sync_api import expect

    home = tmp_path / "first-visit"  # checkpoints/ and data/ of its own, both empty
    empty = home / "no-data"
    for folder in (empty, home / "checkpoints", home / "data"):
        folder.mkdir(parents=True)
    srv = start_server(home, {"GLASSBOX_DATA_DIR": str(empty), "GLASSBOX_MAX_JOBS": "1",
                                  "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    context = browser.new_context(viewport=PROJECTOR)
    page = context.new_page()
    page.set_default_timeout(60_000)
    # What each page must offer a newcomer: the built-in corpus, or a clear next step.
    next_steps = {
        "Home": "corpus always works",             # (its name is also in the hidden table of sources)
        STAGES[0]: "Trained:",                     # the built-in corpus just works
        STAGES[1]: "train a model on stage 4",
        STAGES[2]: "Parameters",
        STAGES[3]: "No pre-training run yet",
        STAGES[4]: "No pre-trained model yet",
        STAGES[5]: "No pre-trained model yet",
        STAGES[6]: "No judge run yet",
    }
    try:
        open_page(page, srv.url)
        failures = []
        for label, hint in next_steps.items():
            go_to(page, label)
            try:
                assert_no_exception(page)
                expect(page.locator('[data-testid="stMain"]').get_by_text(hint).filter(visible=True).first).to_be_visible(timeout=30_000)
            except AssertionError as error:
                failures.append(f"{label}: {str(error).splitlines()[0]}")
        assert not failures, "\n".join(failures)
        go_to(page, STAGES[3])
        page.get_by_role("combobox", name="Corpus").click()
        expect(page.get_by_role("option", name="python-docs")).to_be_visible()
    finally:
        context.close()
        srv.stop()
        kill_jobs(home / "checkpoints")
