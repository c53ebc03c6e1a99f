"""The DPO page (pages/6b_Preference.py): no runs, a start that becomes a job, a finished run's
curves and side-by-side answers, and errors shown as messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.lab import jobs, runs
from core.stages import prefer as stage
from tests.page_helpers import all_text

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "6b_Preference.py")

TOY = [{"instruction": f"Answer question <b>{n}</b>.", "input": "", "output": f"Answer {n}.",
        "chosen": f"Certainly, the answer is {n}. Thank you!", "rejected": f"Ugh, {n}, obviously."}
       for n in range(40)]


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("GLASSBOX_THREADS", "1")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sft_run(tmp_path):
    from core.gpt.instruct import format_prompt
    from core.gpt.model import GPT, preset_config
    from core.gpt.tokenizers import train_bpe
    from core.lab.models import save_model_run

    tokenizer = train_bpe(" ".join(format_prompt(r) + r["chosen"] + r["rejected"] for r in TOY), 300)
    torch.manual_seed(0)
    runs.create_run("sft", "instruct", {})
    save_model_run("sft", GPT(preset_config("tiny", tokenizer.vocab_size, context_length=128)), tokenizer)
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(TOY))
    return f"file:{path}"


@pytest.fixture
def finished_run(sft_run):
    settings = stage.Settings(start="sft", data=sft_run, steps=6, eval_every=3, eval_pairs=4, batch_size=4,
                              answers=2, max_new_tokens=6, beta=0.5, lora_rank=2, run_id="dpo-done")
    with pytest.MonkeyPatch.context() as mp:  # as `python -m core prefer` runs it
        mp.setattr(runs, "_command_line", getattr(runs, "_command_line", False))
        runs.started_from_command_line()
        result = stage.run(settings, progress=None)
        runs.finish_runs_started_here()
    return result


def test_without_any_instruction_tuned_run_the_page_says_where_to_get_one():
    at = page().run()
    assert not at.exception
    text = all_text(at)
    assert "Beyond the seven stages" in at.title[0].value
    assert "No instruction-tuned run yet" in text and "smollm2-135m-instruct" in text
    assert "No DPO run yet" in text
    assert not at.button  # nothing to start from


def test_start_becomes_a_dpo_job_with_the_chosen_settings(sft_run):
    at = page().run()
    assert not at.exception
    assert at.selectbox(key="dpo_start").options == ["sft"]
    at.select_slider(key="dpo_beta").set_value(0.5)
    at.select_slider(key="dpo_rank").set_value(4)
    at.number_input(key="dpo_steps").set_value(3)
    at.text_input(key="dpo_run_name").set_value("from-page")
    at.button(key="dpo_go").click().run()
    assert not at.exception
    try:
        argv = runs.read_json(runs.run_dir("from-page") / "job.json")["argv"]
        assert argv[0] == "prefer"
        for flag, value in (("--from", "sft"), ("--beta", "0.5"), ("--steps", "3"), ("--lora-rank", "4"),
                            ("--run-id", "from-page")):
            assert argv[argv.index(flag) + 1] == value, (flag, argv)
        assert at.session_state["prefer_run"] == "from-page"
        assert at.selectbox(key="dpo_view").value == "from-page"
    finally:
        jobs.stop_job("from-page", force=True)


def test_a_taken_run_name_is_an_error_message_not_a_crash(sft_run):
    runs.create_run("taken", "prefer", {})
    at = page().run()
    at.text_input(key="dpo_run_name").set_value("taken")
    at.button(key="dpo_go").click().run()
    assert not at.exception
    assert any("already exists" in e.value for e in at.error)


def test_a_finished_run_shows_its_curves_metrics_and_answers_side_by_side(finished_run):
    at = page().run()
    assert not at.exception
    assert at.selectbox(key="dpo_view").value == "dpo-done"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Held-out DPO loss"] == f"{finished_run['val_loss']:.3f}"
    assert metrics["Reward accuracy"] == f"{finished_run['reward_accuracy']:.0%}"
    assert metrics["Step"] == "6 / 6"
    charts = at.get("plotly_chart")
    assert len(charts) == 3
    loss_chart = json.loads(charts[0].proto.spec)
    assert [t["name"] for t in loss_chart["data"]] == ["train (batch)", "held-out"]
    assert loss_chart["data"][1]["x"] == [0, 3, 6]  # the start, then every 3 steps
    text = all_text(at)
    assert "LoRA rank 2" in text
    rows = stage.responses("dpo-done")
    assert len(rows) == 2
    assert "SFT (start)" in text and "DPO (tuned)" in text
    assert "<b>" not in text and "&lt;b&gt;" in text  # the instruction's HTML is escaped
    shown = [t.value for t in at.text]
    assert rows[0]["sft_response"] in shown or "(empty)" in shown
    captions = [c.value for c in at.caption]
    assert "`core.gpt.prefer.dpo_loss`" in captions and "`core.gpt.prefer.sequence_logprobs`" in captions
