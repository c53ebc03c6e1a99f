"""A classroom server in AppTest sessions: each learner's name, their own runs, the teacher's page.

Two learners (two AppTest sessions) share one run store: one cannot stop, resume or delete the
other's run, and does not even see it unless they ask for everyone's runs (then read-only); the
teacher, after typing the key, can stop it.
"""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.lab import jobs, learners, runs
from core.lab.learners import Actor, NotYoursError
from tests.page_helpers import all_text

REPO = Path(__file__).resolve().parent.parent
APP, PAGE_4, TEACHER = (str(REPO / p) for p in ("app.py", "pages/4_Pretraining.py", "pages/9_Teacher.py"))


@pytest.fixture
def classroom(monkeypatch):
    monkeypatch.setenv("GLASSBOX_CLASSROOM", "1")
    monkeypatch.setenv("GLASSBOX_TEACHER_KEY", "chalk-and-talk")
    monkeypatch.setenv("GLASSBOX_MAX_JOBS", "2")


def as_learner(path: str, name: str | None, everyone: bool = False, teacher: bool = False) -> AppTest:
    at = AppTest.from_file(path, default_timeout=60)
    if name:
        at.session_state["learner_name"] = name
    at.session_state["learner_everyone"] = everyone
    if teacher:
        at.session_state["learner_teacher"] = True
    at.run()
    assert not at.exception, at.exception
    return at


def alices_job() -> str:
    """A pre-training job of alice's, long enough to still be active while the sessions look."""
    jobs.start_job(["pretrain", "--data", "python-docs", "--tokenizer", "char", "--preset", "tiny", "--minutes", "5",
                    "--run-id", "alice-run", "--quiet"], "alice-run", owner="alice")
    return "alice-run"


def buttons(at: AppTest) -> set[str]:
    return {b.label for b in at.button}


def test_a_first_visit_asks_for_a_name_and_the_sidebar_shows_it(classroom):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Pick a name" in all_text(at) and not at.header  # no stage page before a name
    at.text_input[0].input("../root")
    at.button[0].click().run()
    assert "cannot be a learner's name" in at.error[0].value
    at.text_input[0].input("Ada Lovelace")
    at.button[0].click().run()
    assert at.session_state["learner_name"] == "ada-lovelace"
    assert "You are **ada-lovelace**" in [m.value for m in at.sidebar.markdown]


def test_another_learners_run_is_hidden_then_read_only_and_core_refuses_its_stop(classroom):
    run_id = alices_job()
    bob = as_learner(PAGE_4, "bob")
    assert "No pre-training run yet" in all_text(bob)  # alice's run is not in bob's list
    bob = as_learner(PAGE_4, "bob", everyone=True)
    assert bob.selectbox(key="pt_shown").value == run_id
    assert "Stop" not in buttons(bob) and "read-only" in all_text(bob)
    with pytest.raises(NotYoursError):
        jobs.stop_job(run_id, actor=Actor("bob"))
    assert jobs.job_state(run_id).active

    alice = as_learner(PAGE_4, "alice")
    assert alice.selectbox(key="pt_shown").value == run_id and "Stop" in buttons(alice)


def test_the_teacher_unlocks_the_page_with_the_key_and_may_stop_anyones_job(classroom):
    run_id = alices_job()
    page = as_learner(TEACHER, "mr-k")
    assert not page.header  # locked: only the key field
    page.text_input(key="teacher_key_typed").input("wrong").run()
    assert "not the teacher's key" in page.error[0].value and not page.header
    page.text_input(key="teacher_key_typed").input("chalk-and-talk").run()
    assert page.session_state["learner_teacher"] is True
    page.run()
    assert "1 · Everyone's progress through the seven stages" in [h.value for h in page.header]
    stop = [b for b in page.button if b.label == "Stop"]
    assert stop, "the teacher sees a Stop for alice's job"
    stop[0].click().run()
    assert jobs.job_state(run_id).state in ("stopping", "stopped")


def test_the_teachers_page_off_a_classroom_shows_everything_without_a_key(monkeypatch):
    with runs.quick_run("tok", "tokenizer", {"tokenizer": "char", "vocab_size": 65}):
        pass
    at = as_learner(TEACHER, None)
    assert [h.value for h in at.header][:2] == ["1 · Everyone's progress through the seven stages",
                                               "2 · Jobs running and queued"]
    assert not at.text_input  # no key asked on one's own laptop
    assert learners.owner_of("tok") is None


def finished_pretrain(run_id: str, owner: str, val_loss: float):
    runs.create_run(run_id, "pretrain", {"data": "tinyshakespeare", "preset": "small", "train": {"max_minutes": 5}})
    for step in (1, 10, 20):
        runs.append_jsonl(runs.run_dir(run_id) / "metrics.jsonl",
                          {"step": step, "train_loss": 4.0 - step / 10, "val_loss": 4.1 - step / 10})
    runs.write_status(run_id, "finished", result={"val_loss": val_loss, "train_loss": val_loss - 0.1})
    learners.set_owner(run_id, owner)


def test_projector_mode_follows_one_learner_large_and_without_the_sidebar():
    finished_pretrain("ada-run", "ada", 1.912)
    at = as_learner(TEACHER, None)
    at.toggle(key="t_projector").set_value(True).run()
    assert not at.exception
    assert at.selectbox(key="t_follow").value == "ada"
    assert "ada · ada-run · pretrain" in [s.value for s in at.subheader]
    assert {m.label: m.value for m in at.metric}["val loss"] == "1.912"
    assert "stSidebar" in at.get("html")[0].proto.body  # the sidebar hidden for the projector
    assert not at.header  # nothing else on the screen


def test_the_leaderboard_and_the_report_card_on_the_page_and_the_command_line(tmp_path):
    from core.__main__ import run_command

    finished_pretrain("ada-run", "ada", 1.912)
    finished_pretrain("bob-run", "bob", 1.850)
    at = as_learner(TEACHER, None)
    board = at.dataframe[1].value  # after the progress table: validation loss after 5 minutes of `small`
    assert list(board["run_id"]) == ["bob-run", "ada-run"] and list(board["rank"]) == [1, 2]
    assert at.get("download_button")[0].proto.label.startswith("Download the report card")

    out = run_command(["classroom", "--minutes", "5", "--report", "ada", "--out", str(tmp_path / "ada.html")])
    assert [row["run_id"] for row in out["leaderboard"]["pretrain"]] == ["bob-run", "ada-run"]
    card = (tmp_path / "ada.html").read_text()
    assert "ada-run" in card and "bob-run" not in card and "<svg" in card
