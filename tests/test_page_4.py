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


def run_with_history(run_id: str, steps=(0, 10, 30), old: bool = False):
    """A small run on disk with fp16 snapshots at `steps` (weights nudged between them), no training."""
    import torch

    from core.gpt.model import GPT, GPTConfig
    from core.gpt.tokenizers import train_char
    from core.lab import snapshots
    from core.lab.models import save_model_run

    tok = train_char("the cat sat on the mat. The Dog ate 12 eggs!\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_head=2, n_layer=2))
    config = {"data": "tinyshakespeare", "tokenizer": "char", "preset": "tiny", "vocab_size": tok.vocab_size,
              "train": {"max_steps": 30}}
    if not old:
        config["snapshots"] = {"budget_bytes": 2**24, "probe": "the cat sat on the mat"}
    runs.create_run(run_id, "pretrain", config)
    save_model_run(run_id, model, tok)
    plan = snapshots.Plan(2**24, model)
    for step in ([] if old else steps):
        with torch.no_grad():
            model.wte.weight.mul_(1.1)
        plan.save(runs.run_dir(run_id), model, step)
    runs.write_status(run_id, "finished")


def test_the_time_slider_redraws_a_chosen_snapshot_and_searches_the_map():
    run_with_history("hist")
    at = page()
    slider = at.select_slider(key="pt_history_step")
    assert list(slider.options) == ["0", "10", "30"] and slider.value == 30
    assert any("Sample at step 30" in m.value for m in at.markdown)
    slider.set_value(10).run()
    assert not at.exception and not at.error
    assert any("Sample at step 10" in m.value for m in at.markdown)
    charts = {c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")}
    assert {"pt_history_losses", "pt_history_attention", "pt_history_map", "pt_history_positions"} <= charts
    at.text_input(key="pt_history_query").input("e").run()
    assert any(m.value.startswith("Nearest by cosine: `e` 1.00") for m in at.markdown)
    at.text_input(key="pt_history_query").input("Z").run()
    assert any("not a single token" in w.value for w in at.warning) and not at.exception


def test_the_slider_names_a_damaged_snapshot_and_explains_an_old_run():
    run_with_history("hist")
    (runs.run_dir("hist") / "snapshots" / "step-000010.safetensors").write_bytes(b"broken")
    at = page()
    assert any("step-000010.safetensors" in w.value for w in at.warning)
    assert list(at.select_slider(key="pt_history_step").options) == ["0", "30"]
    run_with_history("old", old=True)
    at.run()
    at.selectbox(key="pt_shown").select("old").run()
    assert not at.exception
    assert any("before training snapshots existed" in i.value for i in at.info)
    assert any("Sample at step final" in m.value for m in at.markdown)  # its final weights still show
