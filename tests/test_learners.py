"""A shared classroom server: learners own their runs, jobs and uploads; the teacher may change all.

Each test here failed on the code before issue 22's ownership (anyone could stop, resume, delete
or overwrite anyone's work), and the checks are in `core`, so they hold whatever page asks.
"""

import os
import time

import pytest

from core.gpt.errors import TrainingError
from core.lab import data, jobs, learners, runs, server_settings
from core.lab.errors import DataError, JobError
from core.lab.learners import Actor, NotYoursError

ALICE, BOB, TEACHER = Actor("alice"), Actor("bob"), Actor("mr-k", teacher=True)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def countdown(run_id, owner, steps=2000):
    return jobs.start_job(["countdown", "--steps", str(steps), "--delay", "0.05", "--run-id", run_id],
                          run_id, owner=owner)


@pytest.mark.parametrize("typed, stored", [("Alice", "alice"), ("  Ada Lovelace ", "ada-lovelace"), ("r2_d2", "r2_d2")])
def test_a_learners_name_is_stored_plainly(typed, stored):
    assert learners.learner_name(typed) == stored


@pytest.mark.parametrize("bad", ["", "   ", "../bob", "a/b", "teacher", "x" * 25, "<b>", "-dash"])
def test_names_that_could_escape_or_impersonate_are_refused(bad):
    with pytest.raises(learners.LearnerError, match="cannot be a learner's name"):
        learners.learner_name(bad)


def test_only_the_owner_and_the_teacher_may_stop_resume_or_delete(monkeypatch):
    monkeypatch.setenv("GLASSBOX_MAX_JOBS", "2")
    countdown("alices-run", "alice")
    wait_for(lambda: jobs.job_state("alices-run").state == "running")
    assert jobs.job_state("alices-run").owner == "alice"

    for action in (lambda: jobs.stop_job("alices-run", actor=BOB), lambda: jobs.resume_job("alices-run", actor=BOB),
                   lambda: jobs.delete_run("alices-run", actor=BOB)):
        with pytest.raises(NotYoursError, match="Only its owner 'alice' and the teacher"):
            action()
    assert jobs.job_state("alices-run").state == "running"  # bob changed nothing

    with pytest.raises(JobError, match="still running"):
        jobs.delete_run("alices-run", actor=ALICE)
    jobs.stop_job("alices-run", actor=ALICE)
    wait_for(lambda: jobs.job_state("alices-run").state == "stopped")
    jobs.resume_job("alices-run", actor=TEACHER)  # the teacher may resume anyone's run
    wait_for(lambda: jobs.job_state("alices-run").state == "running")
    jobs.stop_job("alices-run", actor=TEACHER)
    wait_for(lambda: jobs.job_state("alices-run").state == "stopped")
    jobs.delete_run("alices-run", actor=TEACHER)
    assert not runs.run_dir("alices-run").exists()


def test_a_run_with_no_owner_belongs_to_the_teacher_alone():
    with runs.quick_run("prepared", "tokenizer", {"tokenizer": "char"}):
        pass  # made at a terminal, or by the teacher before class
    assert learners.owner_of("prepared") is None
    assert not learners.may_change("prepared", ALICE)
    with pytest.raises(NotYoursError, match="Only the teacher may delete"):
        jobs.delete_run("prepared", actor=ALICE)
    assert learners.may_change("prepared", TEACHER) and learners.may_change("prepared", None)


def test_a_planted_owner_file_that_is_a_link_is_not_believed(tmp_path):
    with runs.quick_run("linked", "tokenizer", {"tokenizer": "char"}):
        pass
    fake = tmp_path / "fake.json"
    fake.write_text('{"owner": "bob"}')
    (runs.run_dir("linked") / "owner.json").symlink_to(fake)
    assert learners.owner_of("linked") is None and not learners.may_change("linked", BOB)


def test_a_learners_quota_of_jobs_holds(monkeypatch):
    monkeypatch.setenv("GLASSBOX_MAX_JOBS", "1")
    monkeypatch.setenv("GLASSBOX_MAX_JOBS_PER_LEARNER", "2")
    countdown("a1", "alice")
    countdown("a2", "alice")  # queued behind a1: still counts
    with pytest.raises(JobError, match="already have 2 job"):
        countdown("a3", "alice")
    assert not runs.run_dir("a3").exists()  # refused before anything was made
    countdown("b1", "bob")  # another learner's quota is their own
    assert {s.run_id: s.owner for s in jobs.active_jobs()} == {"a1": "alice", "a2": "alice", "b1": "bob"}
    jobs.stop_job("a1", actor=ALICE)
    wait_for(lambda: not jobs.job_state("a1").active)
    countdown("a3", "alice")  # one ended: room again


def test_two_learners_uploads_of_one_name_never_replace_each_other():
    a = data.save_upload("notes.txt", b"alice's own text", owner="alice")
    b = data.save_upload("notes.txt", b"bob's own text", owner="bob")
    assert (a, b) == ("upload:alice/notes.txt", "upload:bob/notes.txt")
    assert data.read_text(a) == "alice's own text" and data.read_text(b) == "bob's own text"
    data.save_upload("shared.txt", b"for everyone")  # the teacher's, or off a classroom
    names = [u["name"] for u in data.list_uploads("bob")]
    assert names == ["upload:bob/notes.txt", "upload:shared.txt", "upload:alice/notes.txt"]  # own first
    alone = [u["name"] for u in data.list_uploads("bob", everyone=False)]
    assert alone == ["upload:bob/notes.txt", "upload:shared.txt"]
    for trick in ("../alice/notes.txt", "alice/../../x", "Teacher/notes.txt"):
        with pytest.raises(DataError):
            data.read_text("upload:" + trick)


def test_a_resume_on_a_changed_corpus_is_refused():
    from core.__main__ import run_command

    source = data.save_upload("corpus.txt", ("To be or not to be, that is the question. " * 60).encode(), owner="alice")
    tiny = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--eval-batches", "2", "--quiet"]
    run_command(["pretrain", "--data", source, "--steps", "4", "--run-id", "p1", *tiny])
    assert runs.open_run("p1").config["data_sha256"]
    data.save_upload("corpus.txt", ("Something else entirely, a new text. " * 60).encode(), owner="alice")
    with pytest.raises(TrainingError, match="has changed since run 'p1' started"):
        run_command(["pretrain", "--data", source, "--steps", "8", "--run-id", "p1", "--resume", *tiny])
    assert runs.open_run("p1").config["train"]["max_steps"] == 4  # nothing saved was touched


# ---------------------------------------------------------------------------- the settings file


def test_the_shipped_settings_file_documents_every_setting_and_changes_nothing():
    text = server_settings.DEFAULT_FILE.read_text()
    assert server_settings.read(server_settings.DEFAULT_FILE) == {}  # every line commented: defaults
    for key in server_settings.KEYS:
        assert f"# {key} = " in text, key


def test_a_settings_file_sets_the_environment_and_the_shell_wins(tmp_path, monkeypatch):
    path = tmp_path / "room.toml"
    path.write_text('[glassbox]\nclassroom = true\nmax_job_minutes = 10\nimport_dirs = ["/srv/models", "/srv/b"]\n'
                    'judge_allow_hosts = ["loopback"]\n')
    monkeypatch.setenv("GLASSBOX_MAX_JOB_MINUTES", "30")
    for name in ("GLASSBOX_CLASSROOM", "GLASSBOX_IMPORT_DIRS"):
        monkeypatch.delenv(name, raising=False)
    server_settings.apply(path)
    assert learners.classroom_on()
    assert os.environ["GLASSBOX_MAX_JOB_MINUTES"] == "30"  # the shell's value wins
    assert os.environ["GLASSBOX_IMPORT_DIRS"] == os.pathsep.join(["/srv/models", "/srv/b"])


@pytest.mark.parametrize("body, message", [
    ("max_job_minuts = 5", "unknown setting 'max_job_minuts'"),
    ("max_jobs = 'two'", "max_jobs must be int"),
    ("classroom = 1", "classroom must be bool"),
    ("teacher_key = 'hunter2'", "is a secret"),
    ("import_dirs = '/srv'", "a list of strings"),
    ("[glassbox\n", "not valid TOML"),
])
def test_a_wrong_settings_file_says_what_is_wrong(tmp_path, body, message):
    path = tmp_path / "room.toml"
    path.write_text(body)
    with pytest.raises(server_settings.SettingsError, match=message) as caught:
        server_settings.read(path)
    assert "hunter2" not in str(caught.value)


