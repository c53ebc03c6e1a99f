"""Page 4 (pre-training) renders without runs, with runs (live figures, charts, samples,
comparison), and its Start button launches a `pretrain` job with the chosen settings."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.lab import jobs, runs
from tests.page_helpers import run_page

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "4_Pretraining.py")


def page() -> AppTest:
    return run_page(PAGE)


def fake_run(run_id: str, steps: int = 300, preset: str = "small", state: str = "finished"):
    """A run on disk as a finished job leaves it (no training needed to draw it)."""
    runs.create_run(run_id, "pretrain", {"data": "tinyshakespeare", "tokenizer": "char", "preset": preset,
                                         "vocab_size": 65, "train": {"max_steps": steps}})
    path = runs.run_dir(run_id)
    for step in range(1, steps + 1, 10):
        row = {"step": step, "tokens": step * 2048, "train_loss": 4.2 - step / 200, "lr": 1e-3,
               "tokens_per_s": 20000.0, "elapsed_s": step / 10}
        if step % 100 == 1:
            row["val_loss"] = 4.0 - step / 250
        runs.append_jsonl(path / "metrics.jsonl", row)
    runs.append_jsonl(path / "samples.jsonl", {"step": 1, "tokens": 2048, "text": "xq<script>alert(1)</script>"})
    runs.append_jsonl(path / "samples.jsonl", {"step": 200, "tokens": 409600, "text": "To be or not"})
    runs.write_status(run_id, state)


def test_page_without_runs_invites_a_first_run():
    at = page()
    assert "Stage 4" in at.title[0].value
    assert any("No pre-training run yet" in i.value for i in at.info)
    assert at.selectbox(key="pt_preset").value == "small"
    assert at.button(key="pt_start")
    assert not at.error


def test_page_with_runs_shows_figures_curves_samples_and_comparison():
    fake_run("alpha", preset="small")
    fake_run("beta", preset="tiny")
    at = page()
    assert not at.error
    labels = {m.label: m.value for m in at.metric}
    assert labels["step"] == "291" and labels["val loss"] == "3.196"
    assert labels["tokens seen"] == "596.0 k"
    charts = at.get("plotly_chart")
    assert len(charts) >= 3  # live loss, learning rate, comparison
    samples, compare = (d.value for d in at.dataframe)
    assert list(samples["step"]) == [200, 1]  # newest first
    assert "<script>" in samples["text"].iloc[1]  # shown as text in a table, never as HTML
    assert set(compare["run"]) == {"alpha", "beta"}


def test_switching_the_shown_run_and_the_comparison_axis():
    fake_run("alpha")
    fake_run("beta", steps=100)
    at = page()
    at.selectbox(key="pt_shown").select("beta").run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["step"] == "91"
    at.radio(key="pt_compare_x").set_value("elapsed_s").run()
    assert not at.exception and not at.error


def test_start_button_launches_a_pretrain_job_with_the_settings():
    at = page()
    at.selectbox(key="pt_preset").select("tiny").run()
    at.text_input(key="pt_run_name").input("page-run").run()
    at.button(key="pt_start").click().run()
    assert not at.exception and not at.error
    try:
        state = jobs.job_state("page-run")
        assert state.command == "pretrain"
        argv = state.argv
        assert argv[argv.index("--preset") + 1] == "tiny"
        assert argv[argv.index("--minutes") + 1] == "3.0"
        assert argv[argv.index("--run-id") + 1] == "page-run"
    finally:
        jobs.stop_job("page-run", force=True)


def test_a_bad_run_name_is_refused_on_the_page():
    at = page()
    at.text_input(key="pt_run_name").input("../escape").run()
    at.button(key="pt_start").click().run()
    assert not at.exception
    assert any("not a valid run id" in e.value for e in at.error)
    assert not runs.list_runs()


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_every_preset_offers_its_recipe_as_defaults(preset):
    from core.stages.pretrain import recipe

    at = page()
    at.selectbox(key="pt_preset").select(preset).run()
    assert not at.exception
    assert at.select_slider(key=f"pt_lr_{preset}").value == recipe(preset)["lr"]
    assert at.select_slider(key=f"pt_batch_{preset}").value == recipe(preset)["batch_size"]


def test_a_job_still_starting_or_queued_is_shown_at_once():
    """Right after Start the child process is still loading PyTorch (no config.json yet), or
    waits in the queue: the page must show that job, not "no run yet" or an older run."""
    import os

    fake_run("older", steps=50)
    runs.reserve_run("just-started")
    runs.write_json_atomic(runs.run_dir("just-started") / "job.json", {"argv": ["pretrain", "--run-id", "just-started"]})
    runs.write_status("just-started", "queued", pid=os.getpid(), pid_start=runs.process_start(os.getpid()),
                      message="Queued: waiting for a free slot (limit 1).")
    at = page()
    assert at.selectbox(key="pt_shown").value == "just-started"
    assert any("starting" in i.value for i in at.info)
    assert any("Queued" in m.value for m in at.markdown)
    assert "older" in at.selectbox(key="pt_shown").options
