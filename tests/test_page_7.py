"""Stage 7 page: renders with nothing configured; shows a finished judge run's results."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.lab import judge_client as C
from core.lab import judge_data as D
from core.stages import judge as S
from core.lab import runs
from tests.fake_openai_server import FakeOpenAIServer
from tests.page_helpers import all_text, run_page

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "7_Judge.py")
SECRET = "sk-page-test-SECRET-abcdef123456"



def page() -> AppTest:
    return run_page(PAGE)


def test_page_renders_with_nothing_configured():
    at = page()
    text = all_text(at)
    assert "Stage 7" in at.title[0].value
    assert at.text_input(key="judge_base_url").value == "http://localhost:11434/v1"  # Ollama preset
    assert at.text_input(key="judge_api_key").value == ""
    assert D.load_rubric().sha256[:16] in text                      # the rubric shown with its hash
    assert "finish stage 6 first" not in text                        # no run: data sets offered
    assert "No judge run yet" in text and not at.error
    at.selectbox(key="judge_preset").set_value("LM Studio").run()
    assert at.text_input(key="judge_base_url").value == "http://localhost:1234/v1"


def test_connection_button_reports_what_it_saw():
    with FakeOpenAIServer() as s:
        at = page()
        at.selectbox(key="judge_preset").set_value("Custom").run()
        at.text_input(key="judge_base_url").set_value(s.url)
        at.text_input(key="judge_model").set_value("judge-model")
        at.text_input(key="judge_api_key").set_value(SECRET)
        at.button(key="judge_test").click().run()
        assert not at.exception
        assert any("Connected" in m.value for m in at.success)
        at.text_input(key="judge_base_url").set_value("localhost:1").run()
        at.button(key="judge_test").click().run()
        assert any("http://" in e.value for e in at.error)


def test_finished_judge_run_shows_table_charts_and_downloads():
    runs.create_run("tuned", "instruct", {})
    runs.write_json_atomic(runs.run_dir("tuned") / "responses.json", [
        {"instruction": f"Say <b>{i}</b>", "input": "", "output": str(i),
         "base_response": "no idea", "tuned_response": f"GOOD {i}"} for i in range(3)])
    with FakeOpenAIServer() as s:
        settings = C.EndpointSettings(s.url, "judge-model", api_key=SECRET, max_concurrency=1)
        S.judge_run("judge-done", settings, source_run="tuned")
    at = page()
    text = all_text(at)
    assert at.selectbox(key="judge_show").value == "judge-done"
    assert at.radio(key="judge_source_kind").value == "A stage-6 run"
    table = at.dataframe[-1].value
    assert len(table) == 9 and set(table["kind"]) == {"single", "pairwise"}
    assert list(table[table["kind"] == "single"]["score"].unique()) == [90.0]
    assert "Say <b>0</b>" in set(table["instruction"])      # shown as text by the table, not HTML
    keys = [c.proto.id for c in at.get("plotly_chart")]
    assert any("judge_hist" in k for k in keys) and any("judge_pairwise" in k for k in keys)
    assert any("judge_rouge" in k for k in keys)
    assert "orders disagree" in text.lower() and "from the cache" in text
    assert len(at.get("download_button")) == 2
    assert any("finished" in m.value for m in at.markdown)
    # The raw replies are there on demand.
    assert any(json.loads(c.value).get("score") == 90 for c in at.code if c.value.startswith("{\"criteria"))


def test_start_button_runs_a_job_that_never_writes_the_key(isolated_workspace):
    import time

    from core.lab import jobs

    with FakeOpenAIServer(api_key=SECRET) as s:
        at = page()
        at.selectbox(key="judge_preset").set_value("Custom").run()
        at.text_input(key="judge_base_url").set_value(s.url)
        at.text_input(key="judge_model").set_value("judge-model")
        at.text_input(key="judge_api_key").set_value(SECRET)
        at.radio(key="judge_source_kind").set_value("A data set")
        at.run()
        at.selectbox(key="judge_source_data").set_value("eval-example-data")
        at.number_input(key="judge_limit").set_value(2)
        at.text_input(key="judge_new_id").set_value("from-page")
        at.button(key="judge_start").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        deadline = time.time() + 60
        while jobs.job_state("from-page").active and time.time() < deadline:
            time.sleep(0.3)
        assert jobs.job_state("from-page").state == "finished", jobs.job_state("from-page").log_tail
        at.run()
    assert at.selectbox(key="judge_show").value == "from-page"
    assert len(at.dataframe[-1].value) == 2 * 2 + 2   # two answers graded + one comparison per item
    written = b"".join(p.read_bytes() for p in isolated_workspace["checkpoints"].rglob("*") if p.is_file())
    assert SECRET.encode() not in written


def test_a_run_whose_judgements_all_failed_says_so_with_the_reason():
    """Issue 21: not a green 'finished' with empty charts."""
    with FakeOpenAIServer(responder=lambda body: {"status": 500, "message": "model crashed: out of memory"}) as s:
        settings = C.EndpointSettings(s.url, "judge-model", max_concurrency=1, max_attempts=1)
        with pytest.raises(C.JudgeError, match="All 3 judgements failed"):
            S.judge_run("all-failed", settings, data="instruction-data-with-response", limit=3)
    at = page()
    assert at.selectbox(key="judge_show").value == "all-failed"
    errors = [e.value for e in at.error]
    assert any("All 3 judgements failed" in e and "model crashed: out of memory" in e for e in errors), errors
    assert not any("finished" in m.value for m in at.markdown)
    assert not [c for c in at.get("plotly_chart")]


def test_server_error_text_cannot_load_remote_images():
    tracker = "![pixel](http://198.51.100.7/track.png)"
    with FakeOpenAIServer(list_models=False, responder=lambda body: {"status": 400, "message": f"bad {tracker}"}) as s:
        at = page()
        at.selectbox(key="judge_preset").set_value("Custom").run()
        at.text_input(key="judge_base_url").set_value(s.url)
        at.text_input(key="judge_model").set_value("judge-model")
        at.button(key="judge_test").click().run()
    errors = [e.value for e in at.error]
    assert errors and any("198.51.100.7" in e for e in errors)       # the text is shown ...
    assert not any("![" in e for e in errors), errors                 # ... but never as an image


def test_a_key_in_a_stored_url_is_never_shown():
    runs.create_run("old-judge", "judge", {"labels": ["model_response"], "judge_model": "m",
                                           "judge_base_url": f"http://judge.example/v1?api-key={SECRET}"})
    record = {"item": 0, "kind": "single", "model": "model_response", "status": "ok", "score": 50.0,
              "rouge_l": 0.5, "instruction": "x", "answer": "y", "rationale": "z"}
    runs.append_jsonl(runs.run_dir("old-judge") / "judgements.jsonl", record)
    at = page()
    text = all_text(at) + " ".join(c.value for c in at.caption)
    assert "judge.example/v1?api-key=***" in text and SECRET not in text


def test_resume_sends_a_typed_key_only_to_the_url_it_was_typed_for():
    runs.create_run("theirs", "judge", {"labels": ["a"], "judge_base_url": "http://their-logger.example/v1"})
    assert S.resume_env("theirs", "http://my-judge.example/v1", SECRET) == {
        "GLASSBOX_JUDGE_API_KEY": "", "OPENAI_API_KEY": ""}
    assert S.resume_env("theirs", "http://their-logger.example/v1/", SECRET)["GLASSBOX_JUDGE_API_KEY"] == SECRET


def test_a_job_started_from_the_page_never_sends_the_server_key_elsewhere(monkeypatch):
    """Issue 22: the server's OPENAI_API_KEY, a learner's logging server, no key typed."""
    import time

    from core.lab import jobs

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAIServer() as logger:
        at = page()
        at.selectbox(key="judge_preset").set_value("Custom").run()
        at.text_input(key="judge_base_url").set_value(logger.url)
        at.text_input(key="judge_model").set_value("judge-model").run()
        assert not any("OPENAI_API_KEY" in c.value for c in at.caption)   # not offered for this URL
        at.button(key="judge_test").click().run()
        at.radio(key="judge_source_kind").set_value("A data set").run()
        at.selectbox(key="judge_source_data").set_value("eval-example-data")
        at.number_input(key="judge_limit").set_value(1)
        at.radio(key="judge_mode").set_value("single")
        at.text_input(key="judge_new_id").set_value("no-key-leak")
        at.button(key="judge_start").click().run()
        deadline = time.time() + 60
        while jobs.job_state("no-key-leak").active and time.time() < deadline:
            time.sleep(0.3)
        assert jobs.job_state("no-key-leak").state == "finished", jobs.job_state("no-key-leak").log_tail
        sent = [r["headers"].get("authorization", "") for r in logger.requests]
    assert len(sent) >= 3 and not [h for h in sent if SECRET in h or SECRET[-8:] in h]
