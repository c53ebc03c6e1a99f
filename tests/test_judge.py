"""Stage 7: the judge, through the real `openai` client against a real local HTTP server.

The fake server (tests/fake_openai_server.py) plays every kind of judge: good JSON, fenced JSON,
prose, nonsense, out-of-range scores, 429 with Retry-After, 500s, replies slower than the timeout,
a wrong key, an unknown model, no server at all. Waits between retries are recorded, not slept.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.gpt import judge as J
from core.lab import judge_client as C
from core.lab import judge_settings
from core.lab import judge_data as D
from core.stages import judge as S
from core.lab import runs
from core.lab.errors import DataError, JudgeError
from tests.fake_openai_server import GOOD_SINGLE, FakeOpenAIServer, free_port

SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"

BAD = json.dumps({"criteria": {"correctness": 5}, "score": 150, "rationale": "too generous"})


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def rubric():
    return D.load_rubric()


def settings_for(url, **overrides):
    values = dict(base_url=url, model="judge-model", api_key=SECRET, timeout=5, backoff_s=0.01,
                  max_attempts=3, parse_attempts=3, max_concurrency=1)
    values.update(overrides)
    return C.EndpointSettings(**values)


def make_judge(url, tmp_path, rubric, **overrides):
    waits = []
    judge = C.Judge(settings_for(url, **overrides), rubric, cache=C.JudgeCache(tmp_path / "cache"),
                    sleep=waits.append)
    return judge, waits


def grade(judge):
    return judge.grade("Name the largest planet.", "", "Jupiter is the largest planet.", "Jupiter.")


def all_written_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in Path(root).rglob("*") if p.is_file())


# ------------------------------------------------------------------ settings and the rubric


def test_settings_hide_the_key_and_check_their_values():
    s = settings_for("http://localhost:1234/v1/")
    assert SECRET not in repr(s) and SECRET not in json.dumps(s.public())
    assert s.public()["base_url"] == "http://localhost:1234/v1"
    with pytest.raises(JudgeError, match="API key field") as info:
        settings_for("http://user:hunter2@localhost:1234/v1")   # credentials never ride in the URL
    assert "hunter2" not in str(info.value)
    assert C.redact_url("https://u:p@host:8/v1") == "https://host:8/v1"
    for bad in [dict(base_url="localhost:11434"), dict(model=" "), dict(timeout=0),
                dict(timeout=float("nan")), dict(max_concurrency=0), dict(temperature=-1)]:
        with pytest.raises(JudgeError):
            settings_for("http://localhost:1/v1", **bad) if "base_url" not in bad else \
                C.EndpointSettings(bad["base_url"], "m")
    assert C.PRESETS["Ollama"].base_url == "http://localhost:11434/v1"
    assert {"OpenAI", "Ollama", "vLLM", "llama.cpp server", "LM Studio"} <= set(C.PRESETS)


def test_rubric_is_frozen_by_its_hash(rubric):
    path = D.RUBRICS_DIR / "instruction-v1.json"
    assert rubric.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rubric.version == "instruction-v1" and "instruction-v1" in D.rubric_versions()
    assert [c["name"] for c in rubric.criteria] == ["correctness", "instruction_following",
                                                   "completeness", "concision"]
    assert (rubric.overall["min"], rubric.overall["max"]) == (0, 100)
    for bad in ["../instruction-v1", "nope", ""]:
        with pytest.raises(JudgeError):
            D.load_rubric(bad)


# ------------------------------------------------------------------ reading replies


@pytest.mark.parametrize("reply, score, method", [
    (GOOD_SINGLE, 90, "json"),
    ("```json\n{\"score\": 70, \"rationale\": \"fine\"}\n```", 70, "fenced json"),
    ("Here is my verdict: {\"score\": 55, \"criteria\": {\"correctness\": 3}} Hope it helps.", 55,
     "first json object"),
    ("The answer is right but long. [[80]]", 80, "[[n]]"),
    ("85", 85, "bare number"), ("Score: 85/100", 85, "bare number"), (" 0 ", 0, "bare number"),
])
def test_replies_that_can_be_read(rubric, reply, score, method):
    parsed = J.parse_single_reply(reply, rubric)
    assert parsed["score"] == score and parsed["parse_method"] == method


@pytest.mark.parametrize("reply, why", [
    ("I would rate this answer 85 because it is mostly right, though 2 facts are off.", "no JSON"),
    ("banana", "no JSON"), ("", "no JSON"),
    (BAD, "outside 0-100"), ("[[101]]", "outside"), ("-5", "outside"),
    ('{"score": true}', "not a number"), ('{"score": "high"}', "not a number"),
    ('{"rationale": "no score"}', "no \"score\""),
    ('{"score": 50, "criteria": {"correctness": 9}}', "correctness 9 is outside"),
    ("[[70]] or maybe [[80]]", "no JSON"),
])
def test_replies_that_are_never_turned_into_a_number(rubric, reply, why):
    with pytest.raises(J.ReplyUnreadable, match=why.split()[0]):
        J.parse_single_reply(reply, rubric)


def test_pairwise_replies():
    assert J.parse_pairwise_reply('{"winner": "B", "rationale": "x"}')["winner"] == "B"
    assert J.parse_pairwise_reply("Both are fine. [[C]]")["winner"] == "tie"
    assert J.parse_pairwise_reply("tie")["winner"] == "tie"
    for bad in ["A is better but B is shorter", '{"winner": "both"}']:
        with pytest.raises(J.ReplyUnreadable):
            J.parse_pairwise_reply(bad)


def test_retry_after_header_forms():
    assert C.retry_after_seconds({"retry-after": "2"}) == 2.0
    assert C.retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < C.retry_after_seconds({"retry-after": date}) <= 31
    assert C.retry_after_seconds({}) is None and C.retry_after_seconds({"retry-after": "soon"}) is None


# ------------------------------------------------------------------ statistics and ROUGE-L


def test_rouge_l_is_the_lcs_f1_on_words():
    assert J.rouge_l("The cat sat.", "the cat sat") == 1.0
    assert J.rouge_l("dogs bark", "the cat sat") == 0.0
    assert J.rouge_l("", "x") == 0.0
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 5/5, R = 5/6, F1 = 10/11
    assert J.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert J.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_bootstrap_interval_is_seeded_and_sensible():
    scores = [60, 70, 80, 90, 100, 40, 75]
    low, high = J.bootstrap_ci(scores)
    assert low < sum(scores) / len(scores) < high
    assert J.bootstrap_ci(scores) == [low, high]          # same seed, same interval
    assert J.bootstrap_ci([50, 50]) == [50.0, 50.0] and J.bootstrap_ci([]) is None


@pytest.mark.parametrize("ab, ba, outcome", [
    ("B", "A", "tuned"), ("A", "B", "base"), ("tie", "tie", "tie"),
    ("A", "A", "inconsistent"),   # position bias: "the first one" both times
    ("B", "tie", "inconsistent"),
])
def test_pairwise_outcome_cancels_position_bias(ab, ba, outcome):
    ok = lambda w: {"status": "ok", "winner": w}  # noqa: E731
    assert J.pairwise_outcome("base", "tuned", ok(ab), ok(ba)) == outcome
    assert J.pairwise_outcome("base", "tuned", ok("A"), {"status": "failed"}) == "failed"


# ------------------------------------------------------------------ the endpoint, for real


def test_good_json_asks_for_structured_output(server, tmp_path, rubric):
    judge, waits = make_judge(server.url, tmp_path, rubric)
    result = grade(judge)
    assert result["status"] == "ok" and result["score"] == 90 and result["criteria"]["completeness"] == 4
    assert result["rubric_sha256"] == rubric.sha256
    body = server.chat_requests[0]["body"]
    assert body["response_format"]["type"] == "json_schema" and body["temperature"] == 0
    assert body["response_format"]["json_schema"]["schema"]["properties"]["score"]["maximum"] == 100
    assert server.chat_requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert waits == [] and len(server.chat_requests) == 1


def test_fenced_json_is_repaired_without_a_retry(tmp_path, rubric):
    with FakeOpenAIServer(script=["Sure!\n```json\n{\"score\": 64, \"rationale\": \"ok\"}\n```"]) as s:
        result = grade(make_judge(s.url, tmp_path, rubric)[0])
        assert (result["score"], result["parse_method"], len(s.chat_requests)) == (64, "fenced json", 1)


def test_prose_is_asked_again_with_the_reason(tmp_path, rubric):
    prose = "I would give it 85 out of 100 since it is right."
    with FakeOpenAIServer(script=[prose]) as s:
        result = grade(make_judge(s.url, tmp_path, rubric)[0])
        assert result["status"] == "ok" and result["score"] == 90 and result["attempts"] == 2
        retry = s.chat_requests[1]["body"]["messages"]
        assert retry[-2] == {"role": "assistant", "content": prose}
        assert "could not be used" in retry[-1]["content"]


@pytest.mark.parametrize("reply, reason", [("blah blah, no idea", "no JSON object"), (BAD, "outside 0-100")])
def test_unreadable_replies_end_as_failed_with_the_raw_reply(tmp_path, rubric, reply, reason):
    with FakeOpenAIServer(responder=lambda body: reply) as s:
        judge, _ = make_judge(s.url, tmp_path, rubric)
        result = grade(judge)
        assert result["status"] == "failed" and result.get("score") is None
        assert result["raw_reply"] == reply and reason in result["error"]
        assert len(s.chat_requests) == 3  # parse_attempts
        grade(judge)                      # failures are not cached: asked again
        assert len(s.chat_requests) == 6


def test_429_waits_as_long_as_retry_after_says(tmp_path, rubric):
    script = [{"status": 429, "message": "Rate limit reached", "headers": {"retry-after": "2"}}]
    with FakeOpenAIServer(script=script) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric)
        assert grade(judge)["status"] == "ok"
        assert waits == [2.0] and len(s.chat_requests) == 2


def test_429_asking_for_an_hour_stops_the_evaluation(tmp_path, rubric):
    script = [{"status": 429, "message": "slow down", "headers": {"retry-after": "3600"}}]
    with FakeOpenAIServer(script=script) as s:
        with pytest.raises(C.EndpointUnusable, match="3600"):
            grade(make_judge(s.url, tmp_path, rubric)[0])


def test_500s_back_off_exponentially_then_fail(tmp_path, rubric):
    with FakeOpenAIServer(responder=lambda body: {"status": 500, "message": "GPU on fire"}) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric, max_attempts=3, backoff_s=1.0)
        result = grade(judge)
        assert result["status"] == "failed" and "500" in result["error"] and "3 tries" in result["error"]
        assert len(s.chat_requests) == 3 and len(waits) == 2
        assert 1.0 <= waits[0] <= 1.25 and 2.0 <= waits[1] <= 2.5   # doubling, with jitter


def test_one_500_then_success(tmp_path, rubric):
    with FakeOpenAIServer(script=[{"status": 503, "message": "busy"}]) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric)
        assert grade(judge)["status"] == "ok" and len(waits) == 1


def test_a_reply_slower_than_the_timeout_is_retried_then_failed(tmp_path, rubric):
    with FakeOpenAIServer(responder=lambda body: {"content": GOOD_SINGLE, "delay": 1.5}) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric, timeout=0.3, max_attempts=2)
        result = grade(judge)
        assert result["status"] == "failed" and "no reply within 0.3 s" in result["error"]
        assert len(s.chat_requests) == 2 and len(waits) == 1


def test_connection_refused_is_clear_and_immediate(tmp_path, rubric):
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge, waits = make_judge(url, tmp_path, rubric)
    with pytest.raises(C.EndpointUnusable, match="connection refused") as info:
        grade(judge)
    assert waits == [] and url in str(info.value)


def test_wrong_key_and_unknown_model_stop_at_once_without_leaking_the_key(tmp_path, rubric):
    with FakeOpenAIServer(api_key="sk-the-right-one") as s:  # its 401 echoes the key it was sent
        with pytest.raises(C.EndpointUnusable, match="refused the API key") as info:
            grade(make_judge(s.url, tmp_path, rubric)[0])
        assert SECRET not in str(info.value) and SECRET[-8:] not in str(info.value)
        assert len(s.chat_requests) == 1
    with FakeOpenAIServer() as s:
        with pytest.raises(C.EndpointUnusable, match="does not know the model 'gpt-99'"):
            grade(make_judge(s.url, tmp_path, rubric, model="gpt-99")[0])
        assert len(s.chat_requests) == 1


def test_server_without_structured_output_falls_back_to_plain_prompts(tmp_path, rubric):
    with FakeOpenAIServer(reject_response_format=True) as s:
        judge, _ = make_judge(s.url, tmp_path, rubric)
        assert grade(judge)["status"] == "ok" and judge.structured is False
        assert judge.compare("q", "", "r", "a", "b")["status"] == "ok"
        sent = [(r["body"].get("response_format") or {}).get("type") for r in s.chat_requests]
        assert sent == ["json_schema", "json_object", None, None]  # each form tried once, then never again


def test_a_400_for_another_reason_does_not_switch_structured_output_off(tmp_path, rubric):
    too_long = {"status": 400, "message": "prompt is longer than the context window"}
    with FakeOpenAIServer(script=[too_long] * 3) as s:
        judge, _ = make_judge(s.url, tmp_path, rubric)
        failed = grade(judge)
        assert failed["status"] == "failed" and "longer than the context" in failed["error"]
        assert grade(judge)["status"] == "ok" and judge.output_format == "json_schema"
        sent = [(r["body"].get("response_format") or {}).get("type") for r in s.chat_requests]
        assert sent == ["json_schema", "json_object", None, "json_schema"]


def test_server_that_only_takes_json_object_gets_the_schema_that_way(tmp_path, rubric):
    with FakeOpenAIServer(reject_response_format="json_schema") as s:   # llama-cpp-python's server
        judge, _ = make_judge(s.url, tmp_path, rubric)
        assert grade(judge)["status"] == "ok" and judge.output_format == "json_object"
        last = s.chat_requests[-1]["body"]["response_format"]
        assert last["schema"]["required"] == ["criteria", "score", "rationale"]
        assert [r["body"]["response_format"]["type"] for r in s.chat_requests] == ["json_schema", "json_object"]


def test_cache_answers_the_second_time_without_a_request(server, tmp_path, rubric):
    judge, _ = make_judge(server.url, tmp_path, rubric)
    first, second = grade(judge), grade(judge)
    assert (first["cached"], second["cached"]) == (False, True) and second["score"] == first["score"]
    assert len(server.chat_requests) == 1
    other_model = make_judge(server.url, tmp_path, rubric, api_key="another-key")[0]
    assert grade(other_model)["cached"] is True           # the key is not part of the cache key
    assert SECRET.encode() not in all_written_bytes(tmp_path / "cache")


def test_connection_test_reports_what_it_saw(tmp_path):
    with FakeOpenAIServer(models=["judge-model", "other"]) as s:
        report = C.test_connection(settings_for(s.url))
        assert report["ok"] and report["model_listed"] and report["models"] == ["judge-model", "other"]
        missing = C.test_connection(settings_for(s.url, model="nope"))
        assert not missing["ok"] and "does not know the model 'nope'" in missing["message"]
    with FakeOpenAIServer(list_models=False, script=["OK"]) as s:
        report = C.test_connection(settings_for(s.url))
        assert report["ok"] and report["reply"] == "OK" and "replied 'OK'" in report["message"]
    with FakeOpenAIServer(api_key="sk-right") as s:
        report = C.test_connection(settings_for(s.url))
        assert not report["ok"] and "API key" in report["message"] and SECRET not in json.dumps(report)
    refused = C.test_connection(settings_for(f"http://127.0.0.1:{free_port()}/v1"))
    assert not refused["ok"] and "connection refused" in refused["message"]


# ------------------------------------------------------------------ whole evaluations


def write_stage6_run(run_id="tuned-run", n=4):
    runs.create_run(run_id, "instruct", {"note": "fake stage-6 run for the judge tests"})
    records = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}",
                "base_response": f"bad rambling {i} {i} {i}", "tuned_response": f"GOOD {i}"}
               for i in range(n)]
    runs.write_json_atomic(runs.run_dir(run_id) / "responses.json", records)
    return run_id


def fair_judge(body):
    """Scores GOOD answers 90 and others 20; in pairwise picks the GOOD answer wherever it is."""
    prompt = body["messages"][1]["content"]
    if "### Response A:" in prompt:
        a = prompt.split("### Response A:")[1].split("### Response B:")[0]
        return json.dumps({"winner": "A" if "GOOD" in a else "B", "rationale": "the right number"})
    answer = prompt.split("### Response to grade:")[1].split("Criteria:")[0]
    return json.dumps({"criteria": {"correctness": 5 if "GOOD" in answer else 1}, "rationale": "r",
                       "score": 90 if "GOOD" in answer else 20})


def test_judging_a_stage6_run_single_and_pairwise(tmp_path):
    source = write_stage6_run()
    with FakeOpenAIServer(responder=fair_judge) as s:
        result = S.judge_run("judge-1", settings_for(s.url, max_concurrency=3), source_run=source)
        assert len(s.chat_requests) == 4 * 2 + 4 * 2   # both answers graded, both orders compared
    assert result["n"] == 4 and result["failed"] == 0 and result["cached"] == 0
    assert result["mean_scores"] == {"base": 20.0, "tuned": 90.0} and result["mean_score"] == 90.0
    assert result["pairwise_win_rate"] == 1.0 and result["ci95"] == [90.0, 90.0]
    run = runs.open_run("judge-1")
    assert run.stage == "judge" and run.parent == source and run.state == "finished"
    records = S.read_judgements("judge-1")
    assert len(records) == 12 and [r["item"] for r in records] == sorted(r["item"] for r in records)
    assert all(r["rubric_sha256"] == D.load_rubric().sha256 for r in records)
    summary = S.read_summary("judge-1")
    assert summary["pairwise"]["wins"] == 4 and summary["models"]["tuned"]["rouge_l"] == pytest.approx(abs=1e-4, expected=
        J.rouge_l("GOOD 0", "0"))
    assert summary["complete"] and summary["models"]["base"]["criteria"]["correctness"] == 1


def test_a_position_biased_judge_gets_ties_not_wins(tmp_path):
    source = write_stage6_run(n=3)
    with FakeOpenAIServer(responder=lambda body: '{"winner": "A", "rationale": "first is best"}') as s:
        result = S.judge_run("judge-biased", settings_for(s.url), source_run=source, mode="pairwise")
    pairwise = S.read_summary("judge-biased")["pairwise"]
    assert result["pairwise_win_rate"] == 0.0 and pairwise["inconsistent"] == 3 and pairwise["ties"] == 3


def test_a_rerun_costs_no_requests_and_failures_are_counted(tmp_path):
    replies = {"n": 0}

    def sometimes_nonsense(body):
        replies["n"] += 1
        return "nonsense" if "walrus" in json.dumps(body) else fair_judge(body)

    with FakeOpenAIServer(responder=sometimes_nonsense) as s:
        settings = settings_for(s.url, max_concurrency=2)
        first = S.judge_run("j-a", settings, data="instruction-data-with-response", limit=6)
        sent = len(s.chat_requests)
        again = S.judge_run("j-b", settings, data="instruction-data-with-response", limit=6)
    assert first["n"] == 6 and first["judgements"] == 6 and first["pairwise_win_rate"] is None
    assert again["cached"] == 6 - again["failed"] and again["mean_score"] == first["mean_score"]
    assert len(s.chat_requests) == sent + 3 * again["failed"]  # only failures are asked again
    assert S.read_summary("j-b")["requests"] == 3 * again["failed"]


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path):
    source = write_stage6_run(n=5)
    port = free_port()
    with FakeOpenAIServer(responder=fair_judge, port=port) as s:
        S.judge_run("warm", settings_for(s.url), source_run=source, mode="single", limit=2)  # 4 cached
        url, before = s.url, len(s.chat_requests)
    # The server is gone (a pulled plug): the run stops at once and says why.
    with pytest.raises(C.EndpointUnusable):
        S.judge_run("resumable", settings_for(url), source_run=source, mode="single")
    assert "connection refused" in S.read_summary("resumable")["error"]
    with FakeOpenAIServer(responder=fair_judge, port=port) as s:
        with pytest.raises(JudgeError, match="other settings"):
            S.judge_run("resumable", settings_for(url), source_run=source, mode="both", resume=True)
        result = S.judge_run("resumable", settings_for(url), source_run=source, mode="single", resume=True)
        assert len(s.chat_requests) == 10 - 4   # only the judgements nobody had made yet
    assert before == 4 and result["judgements"] == 10 and result["cached"] == 4 and result["failed"] == 0
    assert len(S.read_judgements("resumable")) == 10


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(DataError, match="holds no model answers"):
        D.load_items(data="sms-spam")
    with pytest.raises(JudgeError, match="not both"):
        D.load_items(run="x", data="eval-example-data")
    runs.create_run("no-answers", "instruct", {})
    with pytest.raises(DataError, match="no responses.json"):
        D.load_items(run="no-answers")
    runs.write_json_atomic(runs.run_dir("no-answers") / "responses.json", [{"instruction": "x"}])
    with pytest.raises(DataError, match="lacks output, base_response"):
        D.load_items(run="no-answers")
    items, labels = D.load_items(data="eval-example-data")
    assert len(items) == 100 and labels == ["model 1", "model 2"]
    with pytest.raises(JudgeError, match="two answers"):
        C.plan_tasks(D.load_items(data="instruction-data-with-response")[0], ["model_response"], "pairwise")


# ------------------------------------------------------------------ the command line and the job


def test_cli_and_background_job_never_write_the_key(tmp_path, monkeypatch, capsys):
    from core.__main__ import main
    from core.lab import jobs

    checkpoints = Path(os.environ["GLASSBOX_CHECKPOINTS_DIR"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAIServer(responder=fair_judge, api_key=SECRET) as s:
        argv = ["judge", "--data", "eval-example-data", "--base-url", s.url, "--model", "judge-model",
                "--limit", "2", "--run-id", "cli-run", "--timeout", "5"]
        assert main(argv) == 0
        headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {"n", "mean_score", "ci95", "failed", "pairwise_win_rate", "cached"} <= set(headline)
        assert headline["n"] == 2
        # A wrong key: exit 2 with a clear line, and the server's echo of the key is not repeated.
        monkeypatch.setenv("OPENAI_API_KEY", SECRET[::-1])
        assert main(argv[:-4] + ["--limit", "3", "--run-id", "cli-bad"]) == 2
        err = capsys.readouterr().err
        assert "refused the API key" in err and SECRET[::-1] not in err
        monkeypatch.delenv("OPENAI_API_KEY")
        # The page's way: a background job with the key only in the child's environment.
        job_argv = ["judge", "--data", "eval-example-data", "--base-url", s.url, "--model", "judge-model",
                    "--limit", "3", "--run-id", "job-run"]
        jobs.start_job(job_argv, "job-run", env={"OPENAI_API_KEY": SECRET})
        deadline = time.time() + 60
        while jobs.job_state("job-run").active and time.time() < deadline:
            time.sleep(0.2)
        state = jobs.job_state("job-run")
        assert state.state == "finished", state.log_tail
        assert state.result["n"] == 3
    written = all_written_bytes(checkpoints)
    assert SECRET.encode() not in written
    assert SECRET[::-1].encode() not in written and SECRET[-8:].encode() not in written
    assert (checkpoints / "job-run" / "job.log").is_file() and (checkpoints / ".judge-cache").is_dir()


def test_cli_user_mistakes_exit_2(capsys):
    from core.__main__ import main

    assert main(["judge", "--data", "sms-spam", "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "m", "--run-id", "x"]) == 2
    assert "holds no model answers" in capsys.readouterr().err
    base = ["judge", "--data", "eval-example-data", "--model", "m", "--run-id", "y"]
    for extra, says in [(["--base-url", "ftp://x"], "http://"),
                        (["--base-url", "http://127.0.0.1:9/v1", "--timeout", "-1"], "timeout"),
                        (["--base-url", "http://127.0.0.1:9/v1", "--concurrency", "0"], "between 1 and 32"),
                        (["--base-url", "http://127.0.0.1:9/v1", "--limit", "0"], "--limit"),
                        (["--base-url", "http://127.0.0.1:9/v1", "--run-id", "../up"], "not a valid run id"),
                        (["--base-url", "http://127.0.0.1:9/v1", "--rubric", "../../etc/passwd"], "not a rubric")]:
        assert main(base + extra) == 2
        assert says in capsys.readouterr().err
    assert main(["judge", "--run", "a", "--data", "eval-example-data", "--base-url", "http://x/v1",
                 "--model", "m"]) == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="checks the CLI in a real child process")
def test_cli_in_a_child_process_prints_json_last(tmp_path):
    with FakeOpenAIServer() as s:
        env = dict(os.environ, OPENAI_API_KEY=SECRET)
        out = subprocess.run([sys.executable, "-m", "core", "judge", "--data", "instruction-data-with-response",
                              "--limit", "2", "--base-url", s.url, "--model", "judge-model", "--run-id", "child"],
                             env=env, capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["n"] == 2 and last["mean_score"] == 90.0 and "Judged 2/2" in out.stderr


def test_a_stop_request_ends_the_evaluation_early_and_keeps_what_is_done(tmp_path, rubric):
    items, labels = D.load_items(data="eval-example-data")
    with FakeOpenAIServer() as s:
        judge, _ = make_judge(s.url, tmp_path, rubric)
        records, stopped = C.evaluate(judge, items[:10], labels, "single", should_stop=lambda: True)
    assert stopped and 1 <= len(records) < 20 and len(s.chat_requests) == len(records)
    assert all(r["status"] == "ok" for r in records)


# ------------------------------------------------------------------ real servers' refusals (issue 21)


def test_llama_cpp_python_refuses_json_schema_with_a_500_and_gets_json_object(tmp_path, rubric):
    """Its 500 names response_format.type: one more request in json_object + schema, never 4 retries."""
    with FakeOpenAIServer(like="llama-cpp-python", models=("smollm2",)) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric, model="smollm2")
        assert grade(judge)["status"] == "ok" and judge.output_format == "json_object"
        assert judge.compare("q", "", "r", "a", "b")["status"] == "ok"
        sent = [r["body"].get("response_format") for r in s.chat_requests]
        assert [f["type"] for f in sent] == ["json_schema", "json_object", "json_object"] and waits == []
        assert sent[1]["schema"]["required"] == ["criteria", "score", "rationale"]
        assert "JSON schema" in s.chat_requests[1]["body"]["messages"][-1]["content"]   # also in the prompt
        # Remembered per endpoint: the next judge (a new run, a resumed one) asks json_object at once.
        again, _ = make_judge(s.url, tmp_path, rubric, model="smollm2")
        again.grade("Name a colour.", "", "Red.", "Blue.")
        assert s.chat_requests[-1]["body"]["response_format"]["type"] == "json_object" and len(s.chat_requests) == 4


def test_a_run_against_llama_cpp_python_succeeds_and_says_which_form_it_used(tmp_path):
    source = write_stage6_run(n=3)
    with FakeOpenAIServer(like="llama-cpp-python", models=("smollm2",), responder=fair_judge) as s:
        result = S.judge_run("judge-llama", settings_for(s.url, model="smollm2", max_concurrency=2),
                             source_run=source)
        probes = [r for r in s.chat_requests if r["body"]["response_format"]["type"] == "json_schema"]
    assert result["failed"] == 0 and result["mean_scores"] == {"base": 20.0, "tuned": 90.0}
    assert len(probes) == 1   # probed once, alone, before the pool fanned out
    assert S.read_summary("judge-llama")["structured_output"] == "json_object"


def test_a_run_whose_judgements_all_failed_exits_non_zero_with_the_servers_reason(capsys, monkeypatch):
    from core.__main__ import main

    with FakeOpenAIServer(responder=lambda body: {"status": 500, "message": "CUDA out of memory\nat layer 3"}) as s:
        argv = ["judge", "--data", "eval-example-data", "--base-url", s.url, "--model", "judge-model",
                "--limit", "2", "--max-attempts", "1", "--run-id", "all-failed"]
        assert main(argv) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert out == "" and errors == [err.strip().splitlines()[-1]]          # one line, the last
    assert errors[0].startswith("error: All 6 judgements failed") and "CUDA out of memory at layer 3" in errors[0]
    assert runs.read_status("all-failed")["state"] == "failed"
    summary = S.read_summary("all-failed")
    assert summary["failed"] == 6 and "CUDA out of memory" in summary["error"]


# ------------------------------------------------------------------ a shared classroom server (issue 22)


def test_the_server_key_never_leaves_for_an_endpoint_it_is_not_pinned_to(monkeypatch, capsys):
    """A learner's loopback logging server: the app's OPENAI_API_KEY never reaches it."""
    from core.__main__ import main

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAIServer() as logger:
        # The app (page, jobs): the server key goes only to the pinned URL (default: OpenAI's).
        assert S.key_for(logger.url, typed_key="") == "" and not S.uses_server_key(logger.url)
        report = S.check_endpoint(logger.url, "judge-model")
        assert report["ok"]
        # From a shell with a pin set: the exported key goes nowhere else either.
        monkeypatch.setenv("GLASSBOX_JUDGE_KEY_URL", "https://api.openai.com/v1")
        assert main(["judge", "--data", "eval-example-data", "--base-url", logger.url, "--model", "judge-model",
                     "--limit", "1", "--mode", "single", "--run-id", "pinned-elsewhere"]) == 0
        capsys.readouterr()
        sent = [r["headers"].get("authorization", "") for r in logger.requests]
        assert len(sent) >= 3 and not [h for h in sent if SECRET in h]
        # The control: pinned to this URL, the key is sent (so the check above can fail).
        monkeypatch.setenv("GLASSBOX_JUDGE_KEY_URL", logger.url)
        assert S.key_for(logger.url, typed_key="") == SECRET
        S.check_endpoint(logger.url, "judge-model")
        assert logger.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert S.key_for("https://api.openai.com/v1", "") == ""   # pinned elsewhere now
    # A judge job gets exactly its own key, with the inherited one blanked.
    assert judge_settings.job_env("") == {"GLASSBOX_JUDGE_API_KEY": "", "OPENAI_API_KEY": ""}


@pytest.mark.parametrize("url, kind", [
    ("http://169.254.169.254/latest/v1", "link-local"), ("http://127.0.0.1:8501/v1", "loopback"),
    ("http://[::1]:9000/v1", "loopback"), ("http://10.1.2.3/v1", "private"), ("http://localhost:9/v1", "loopback"),
    ("http://[::ffff:127.0.0.1]:9/v1", "loopback"), ("http://0.0.0.0:9/v1", "loopback"),
    ("http://100.64.0.9/v1", "private"), ("http://[fe80::1]/v1", "link-local"),
])
def test_non_public_judge_hosts_are_refused_unless_allowed(monkeypatch, url, kind):
    monkeypatch.delenv("GLASSBOX_JUDGE_ALLOW_HOSTS")
    with pytest.raises(judge_settings.EndpointRefused, match=kind):
        judge_settings.check_base_url(url)
    monkeypatch.setenv("GLASSBOX_JUDGE_ALLOW_HOSTS", kind)
    judge_settings.check_base_url(url)
    monkeypatch.setenv("GLASSBOX_JUDGE_ALLOW_HOSTS", "")
    monkeypatch.setenv("GLASSBOX_JUDGE_ENDPOINTS", url)          # listed by the teacher: allowed
    judge_settings.check_base_url(url)


def test_the_allow_list_and_the_local_presets(monkeypatch):
    monkeypatch.delenv("GLASSBOX_JUDGE_ALLOW_HOSTS")
    for preset in ("http://localhost:11434/v1", "http://localhost:8080/v1/"):
        judge_settings.check_base_url(preset)                   # the offline judges work out of the box
    judge_settings.check_base_url("https://93.184.215.14/v1")   # a public host
    monkeypatch.setenv("GLASSBOX_JUDGE_ENDPOINTS", "http://10.0.0.5:8000/v1")
    judge_settings.check_base_url("http://10.0.0.5:8000/v1")
    for other in ("https://93.184.215.14/v1", "http://localhost:11434/v1", "http://10.0.0.5:8001/v1"):
        with pytest.raises(judge_settings.EndpointRefused, match="not one this server allows"):
            judge_settings.check_base_url(other)


def test_a_refused_host_gets_no_request_at_all(monkeypatch, tmp_path, rubric):
    with FakeOpenAIServer() as s:
        monkeypatch.delenv("GLASSBOX_JUDGE_ALLOW_HOSTS")
        report = C.test_connection(settings_for(s.url))
        assert not report["ok"] and "loopback" in report["message"]
        with pytest.raises(judge_settings.EndpointRefused):
            S.judge_run("refused-host", settings_for(s.url), data="eval-example-data", limit=1)
        judge = make_judge(s.url, tmp_path, rubric)[0]          # even a client built directly
        with pytest.raises(C.EndpointUnusable, match="loopback"):
            grade(judge)
        assert s.requests == []


def test_redirects_are_not_followed(tmp_path, rubric):
    with FakeOpenAIServer() as target:
        moved = {"status": 307, "headers": {"location": target.url + "/chat/completions"}, "message": "moved"}
        with FakeOpenAIServer(responder=lambda body: moved) as s:
            judge, waits = make_judge(s.url, tmp_path, rubric)
            with pytest.raises(C.EndpointUnusable, match="redirect"):
                grade(judge)
            assert len(s.chat_requests) == 1 and waits == []
        assert target.requests == []


def test_a_key_in_the_url_query_is_refused_and_never_written(capsys):
    from core.__main__ import main

    url = f"http://127.0.0.1:9/v1?api-key={SECRET}"
    with pytest.raises(JudgeError, match="query string") as info:
        settings_for(url)
    assert SECRET not in str(info.value)
    assert C.redact_url(url) == "http://127.0.0.1:9/v1?api-key=***"
    assert C.redact_url("https://h/v1?a=1&token=sk-x#frag") == "https://h/v1?a=***&token=***"
    assert main(["judge", "--data", "eval-example-data", "--base-url", url, "--model", "m", "--run-id", "q"]) == 2
    out, err = capsys.readouterr()
    assert "query string" in err and SECRET not in out + err
    assert SECRET.encode() not in all_written_bytes(Path(os.environ["GLASSBOX_CHECKPOINTS_DIR"]))


def test_a_deeply_nested_reply_is_a_failed_judgement_not_a_crash(tmp_path, rubric):
    deep = '{"score": ' + "[" * 50_000 + "]" * 50_000 + "}"
    with pytest.raises(J.ReplyUnreadable):
        J.parse_single_reply(deep, rubric)
    with pytest.raises(J.ReplyUnreadable):
        J.parse_pairwise_reply("{" * 200_000)
    source = write_stage6_run(n=2)
    with FakeOpenAIServer(responder=lambda body: deep) as s:
        with pytest.raises(JudgeError, match="All 4 judgements failed"):
            S.judge_run("deep", settings_for(s.url), source_run=source, mode="single")
    records = S.read_judgements("deep")
    assert len(records) == 4 and {r["status"] for r in records} == {"failed"}
    with FakeOpenAIServer(responder=fair_judge, port=int(s.url.split(":")[2].split("/")[0])) as s2:
        result = S.judge_run("deep", settings_for(s2.url), source_run=source, mode="single", resume=True)
    assert result["failed"] == 0 and result["judgements"] == 4     # and the resume does not crash again


def test_a_run_stops_after_n_failures_in_a_row_and_keeps_what_it_finished(monkeypatch):
    monkeypatch.setenv("GLASSBOX_JUDGE_MAX_FAILURES", "3")
    calls = {"n": 0}

    def good_then_nonsense(body):
        calls["n"] += 1
        return GOOD_SINGLE if calls["n"] <= 2 else "nonsense"

    with FakeOpenAIServer(responder=good_then_nonsense) as s:
        settings = settings_for(s.url, parse_attempts=1)
        with pytest.raises(C.TooManyFailures, match="3 judgements failed in a row"):
            S.judge_run("streak", settings, data="instruction-data-with-response", limit=20)
        sent = len(s.chat_requests)
    assert sent in (5, 6)                         # not 20 (one more may have been in flight)
    records = S.read_judgements("streak")
    assert [r["status"] for r in records] == ["ok", "ok"] + ["failed"] * (sent - 2)
    summary = S.read_summary("streak")
    assert summary["models"]["model_response"]["scored"] == 2 and "in a row" in summary["error"]
    assert runs.read_status("streak")["state"] == "failed"


def test_an_endpoint_that_never_answers_is_given_up_on(monkeypatch, tmp_path, rubric):
    monkeypatch.setenv("GLASSBOX_JUDGE_GIVE_UP_S", "1")
    with FakeOpenAIServer(responder=lambda body: {"content": GOOD_SINGLE, "delay": 0.6}) as s:
        judge, waits = make_judge(s.url, tmp_path, rubric, timeout=0.25, max_attempts=1000)
        with pytest.raises(C.EndpointUnusable, match="has not answered"):
            grade(judge)
        assert 2 <= len(s.chat_requests) < 20     # retries would have gone on for 1000 tries


def test_stage_7_end_to_end_against_our_own_serve(tmp_path):
    """`python -m core serve`'s app on loopback, a tiny random model: its JSON-schema decoding gives
    replies the judge can read (the rubric's enums keep 1-5 and 0-100 in range)."""
    import torch

    from core.gpt import tokenizers as tok
    from core.gpt.config import GPTConfig
    from core.gpt.model import GPT
    from core.lab import serve
    from core.lab.tokenizer_files import ByteLevelBPE
    from tests.serve_harness import serving

    shared = Path(os.environ["GLASSBOX_DATA_DIR"].split(os.pathsep)[0])
    tokenizer = ByteLevelBPE.from_bpe(tok.train_bpe((shared / "the-verdict.txt").read_text(encoding="utf-8"), 300))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=4096, n_embd=32, n_head=2, n_layer=2))
    with serving(serve.create_app(serve.Engine("tiny", model.eval(), tokenizer))) as url:
        assert C.test_connection(settings_for(url, model="tiny"))["ok"]
        result = S.judge_run("judge-serve", settings_for(url, model="tiny", timeout=120), data="eval-example-data",
                             limit=1, mode="single")
    summary = S.read_summary("judge-serve")
    assert result["failed"] == 0 and result["judgements"] == 2 and summary["structured_output"] == "json_schema"
    for record in S.read_judgements("judge-serve"):
        assert 0 <= record["score"] <= 100 and set(record["criteria"]) == {
            "correctness", "instruction_following", "completeness", "concision"}


def test_a_preference_run_is_judged_sft_against_dpo():
    """H8's stage writes sft_response / dpo_response: pairwise then asks whether DPO beats SFT."""
    runs.create_run("dpo-run", "prefer", {"note": "fake preference-tuning run"})
    records = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}",
                "sft_response": f"meh {i}", "dpo_response": f"GOOD {i}"} for i in range(3)]
    runs.write_json_atomic(runs.run_dir("dpo-run") / "responses.json", records)
    assert "dpo-run" in S.runs_with_answers()
    with FakeOpenAIServer(responder=fair_judge) as s:
        result = S.judge_run("judge-dpo", settings_for(s.url), source_run="dpo-run", mode="pairwise")
    pairwise = S.read_summary("judge-dpo")["pairwise"]
    assert (pairwise["first"], pairwise["second"], pairwise["wins"]) == ("sft", "dpo", 3)
    assert result["pairwise_win_rate"] == 1.0


def test_the_address_actually_connected_to_is_checked_too(monkeypatch, tmp_path, rubric):
    """A name that resolved to a public address at the check but connects to loopback (DNS rebinding)."""
    monkeypatch.delenv("GLASSBOX_JUDGE_ALLOW_HOSTS")
    monkeypatch.setattr(judge_settings, "_addresses", lambda host, port: ["93.184.215.14"])
    with FakeOpenAIServer() as s:
        judge, _ = make_judge(s.url, tmp_path, rubric)
        with pytest.raises(C.EndpointUnusable, match=r"loopback address \(127\.0\.0\.1\)"):
            grade(judge)
