"""Page 6 (instruction fine-tuning) renders with no runs, and with a finished run side by side."""

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.lab import runs
from core.gpt import instruct as ins
from core.stages import instruct as stage

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "6_Instructions.py")

TOY_RECORDS = [
    {"instruction": f"Say the word number {n}.", "input": "" if n % 2 else f"word <b>{n}</b>",
     "output": f"Word {n}."}
    for n in range(40)
]


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=30)


def all_markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


@pytest.fixture
def finished_run(tmp_path):
    """A tiny start run and a finished (3-step) instruction run made from it."""
    from core.gpt.model import GPT, preset_config
    from core.lab.models import save_model_run
    from core.gpt.tokenizers import train_bpe
    from core.gpt.train import TrainConfig

    tokenizer = train_bpe(" ".join(ins.format_example(r) for r in TOY_RECORDS), 280)
    torch.manual_seed(0)
    runs.create_run("start", "pretrain", {})
    save_model_run("start", GPT(preset_config("tiny", tokenizer.vocab_size)), tokenizer)
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(TOY_RECORDS))
    config = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, eval_every=3, sample_every=3,
                         log_every=1, checkpoint_every=10)
    settings = stage.Settings(start="start", run_id="tuned", data=f"file:{data}", eval_limit=3, max_new_tokens=4)
    with pytest.MonkeyPatch.context() as mp:  # as `python -m core instruct` runs it
        mp.setattr(runs, "_command_line", getattr(runs, "_command_line", False))
        runs.started_from_command_line()
        stage.run(settings, train_config=config)
        runs.finish_runs_started_here()
    return "tuned"


def test_the_run_name_typed_is_the_one_the_job_gets(finished_run, monkeypatch):
    calls = iter(range(10**6))  # a new default name on every rerun, as when the clock ticks
    monkeypatch.setattr(runs, "new_run_id", lambda prefix: f"{prefix}-tick-{next(calls)}")
    at = page().run()
    at.text_input(key="instruct_run_name").set_value("my-tuning")
    at.button[0].click().run()
    assert not at.exception, at.exception
    try:
        job = json.loads((runs.run_dir("my-tuning") / "job.json").read_text())
        assert job["argv"][0] == "instruct"
        assert job["argv"][job["argv"].index("--run-id") + 1] == "my-tuning"
        # The next run gets a fresh default name.
        assert at.text_input(key="instruct_run_name").value.startswith("instruct-tick-")
    finally:
        from core.lab import jobs

        jobs.stop_job("my-tuning", force=True)


def test_page_without_runs_explains_what_to_do():
    at = page().run()
    assert not at.exception
    assert any("Stage 6" in t.value for t in at.title)
    assert any("No pre-trained model yet" in i.value for i in at.info)
    assert any("Honest expectations" in i.value for i in at.info)
    # the data section shows the book's split and the template
    assert [m.value for m in at.metric] == ["935", "55", "110"]
    assert "### Response:" in at.code[0].value


def test_page_shows_a_finished_run_side_by_side(finished_run):
    at = page().run()
    assert not at.exception, at.exception
    assert not at.error
    assert at.selectbox(key="instruct_start").value == "start"
    assert at.selectbox(key="instruct_shown").value == "tuned"
    text = all_markdown(at)
    for header in ("instruction", "reference", "pre-trained", "instruction-tuned"):
        assert f"<th>{header}</th>" in text
    # record inputs are escaped, never rendered as HTML
    assert "word &lt;b&gt;" in text and "<b>3" not in text
    assert "✗" in text  # the untrained start model never stops in 4 tokens
    rates = [m for m in at.metric if m.label.startswith("Pre-trained")]
    assert rates and rates[0].value.endswith("%")


def test_own_instruction_empty_and_answered(finished_run):
    at = page().run()
    at.text_area(key="instruct_own").set_value("   ")
    at.button(key="instruct_ask").click()  # the form's "Ask both models"
    at.run()
    assert any("Type an instruction first" in e.value for e in at.error)

    at.text_area(key="instruct_own").set_value("Name a <colour>.")
    at.slider(key="instruct_own_tokens").set_value(8)
    at.button(key="instruct_ask").click()
    at.run()
    assert not at.exception and not at.error
    text = all_markdown(at)
    assert "Name a &lt;colour&gt;." in text
    assert ">you</td>" in text


def test_a_blank_line_in_a_model_answer_stays_inside_the_table(finished_run):
    """Markdown ends a raw HTML block at an empty line: an answer with one must not spill the table."""
    path = runs.run_dir(finished_run) / "responses.json"
    responses = json.loads(path.read_text())
    responses[0]["tuned_response"] = "First line.\n\n<b>Second</b> line\n\n\nthird"
    responses[0]["output"] = "Reference\n\nwith a gap"
    path.write_text(json.dumps(responses))
    at = page().run()
    assert not at.exception, at.exception
    table = next(m.value for m in at.markdown if m.value.startswith("<table"))
    assert "\n" not in table and table.endswith("</table>")
    assert "First line.<br><br>&lt;b&gt;Second&lt;/b&gt; line<br><br><br>third" in table
    assert "Reference<br><br>with a gap" in table


def test_expected_vs_yours_on_page_6(finished_run, monkeypatch):
    """The reference band behind stage 6's curve and the sentence when the run is above it."""
    from core.lab import references

    model = runs.open_run("tuned").config["model"]
    metrics = runs.read_jsonl(runs.run_dir("tuned") / "metrics.jsonl")
    step = max(m["step"] for m in metrics if m.get("val_loss") is not None)
    monkeypatch.setitem(references.REFERENCES, "test-instruct", {
        "stage": "instruct", "band": 0.1, "match": {"model.n_embd": model["n_embd"], "lora": None},
        "command": "python -m core instruct --from start", "recipe": {}, "machine": "a test",
        "step": [0, step], "train_loss": [0.5, 0.5], "val_loss": [0.01, 0.01]})
    at = page().run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Grey band: the reference run") for c in at.caption)
    assert any(f"At step {step} the validation loss is" in w.value for w in at.warning)
