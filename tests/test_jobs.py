"""Background jobs: start → progress → stop → checkpoint → resume; queueing; crashes; restarts."""

import os
import signal
import time

import pytest

from core.lab import jobs, runs
from core.lab.errors import JobError, RunExistsError


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def steps_logged(run_id):
    return [m["step"] for m in runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl")]


def test_start_progress_stop_checkpoint_resume():
    jobs.start_job(["countdown", "--steps", "400", "--delay", "0.05", "--run-id", "c1"], "c1")
    wait_for(lambda: len(steps_logged("c1")) >= 5)
    assert jobs.job_state("c1").state == "running"
    assert jobs.job_state("c1").alive

    jobs.stop_job("c1")
    state = wait_for(lambda: (s := jobs.job_state("c1")).state in ("stopped", "failed") and s)
    assert state.state == "stopped", state.log_tail
    saved = int(runs.load_tensors(runs.run_dir("c1") / "model.safetensors")["step"])
    assert saved == steps_logged("c1")[-1] and saved < 400

    jobs.resume_job("c1")
    wait_for(lambda: len(steps_logged("c1")) >= saved + 3)
    jobs.stop_job("c1")
    wait_for(lambda: jobs.job_state("c1").state == "stopped")
    steps = steps_logged("c1")
    assert steps == list(range(1, len(steps) + 1))  # resumed from the checkpoint: no gap, no repeat


def test_finished_job_records_its_result():
    jobs.start_job(["countdown", "--steps", "3", "--delay", "0.01", "--run-id", "c2"], "c2")
    state = wait_for(lambda: (s := jobs.job_state("c2")).state == "finished" and s)
    assert state.result == {"run_id": "c2", "steps": 3, "stopped": False}
    assert "[job] result" in (runs.run_dir("c2") / "job.log").read_text()


def test_second_job_is_queued_until_the_first_ends(monkeypatch):
    monkeypatch.setenv("GLASSBOX_MAX_JOBS", "1")
    jobs.start_job(["countdown", "--steps", "1000", "--delay", "0.05", "--run-id", "q1"], "q1")
    wait_for(lambda: jobs.job_state("q1").state == "running")
    jobs.start_job(["countdown", "--steps", "2", "--delay", "0.01", "--run-id", "q2"], "q2")
    queued = wait_for(lambda: (s := jobs.job_state("q2")).state == "queued" and "limit 1" in s.message and s)
    assert "q1" in queued.message
    assert not steps_logged("q2")
    jobs.stop_job("q1")
    wait_for(lambda: jobs.job_state("q2").state == "finished")


def test_crashed_job_is_reported_with_its_log():
    jobs.start_job(["countdown", "--steps", "1000", "--delay", "0.05", "--run-id", "k1"], "k1")
    state = wait_for(lambda: (s := jobs.job_state("k1")).state == "running" and len(steps_logged("k1")) >= 6 and s)
    os.killpg(state.pid, signal.SIGKILL)
    crashed = wait_for(lambda: (s := jobs.job_state("k1")).state == "failed" and s)
    assert "unexpectedly" in crashed.error
    assert "running: python -m core countdown" in crashed.log_tail
    # the last checkpoint survives the kill and the job resumes from it
    saved = int(runs.load_tensors(runs.run_dir("k1") / "model.safetensors")["step"])
    assert saved >= 5
    jobs.resume_job("k1")
    wait_for(lambda: len(steps_logged("k1")) > saved + 2)
    jobs.stop_job("k1")


def test_failed_command_shows_its_error():
    jobs.start_job(["countdown", "--steps", "not-a-number", "--run-id", "f1"], "f1")
    state = wait_for(lambda: (s := jobs.job_state("f1")).state == "failed" and s)
    assert "invalid int value" in state.error


def test_same_run_id_twice_is_refused():
    jobs.start_job(["countdown", "--steps", "2", "--delay", "0.01", "--run-id", "d1"], "d1")
    with pytest.raises(RunExistsError):
        jobs.start_job(["countdown", "--steps", "2", "--run-id", "d1"], "d1")


def test_job_survives_its_starter(tmp_path):
    """A job started by a process that then exits (a restarted Streamlit server) keeps running,
    and a fresh process finds it again from disk."""
    import subprocess
    import sys

    from core.lab.paths import REPO_ROOT

    starter = ("from core.lab import jobs; "
               "jobs.start_job(['countdown','--steps','200','--delay','0.05','--run-id','s1'],'s1')")
    subprocess.run([sys.executable, "-c", starter], cwd=REPO_ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    wait_for(lambda: len(steps_logged("s1")) >= 3)
    assert [s.run_id for s in jobs.active_jobs()] == ["s1"]
    jobs.stop_job("s1")
    wait_for(lambda: jobs.job_state("s1").state == "stopped")


def test_resume_refuses_a_running_job():
    jobs.start_job(["countdown", "--steps", "500", "--delay", "0.05", "--run-id", "r1"], "r1")
    wait_for(lambda: jobs.job_state("r1").state == "running")
    with pytest.raises(JobError, match="still running"):
        jobs.resume_job("r1")
    jobs.stop_job("r1")


def test_a_stop_request_never_overwrites_how_the_job_ended(monkeypatch):
    """The job may react to Stop at once: its "stopped" must win over the app's "stopping"."""
    runs.create_run("quick", "pretrain", {})
    me = os.getpid()  # stands in for the job's process: alive, so the run counts as active
    runs.write_status("quick", "running", pid=me, pid_start=runs.process_start(me))
    really_request = runs.request_stop

    def job_stops_at_once(run_id):
        really_request(run_id)
        runs.write_status(run_id, "stopped", message="Stopped; checkpoint saved.")  # the job's last word

    monkeypatch.setattr(runs, "request_stop", job_stops_at_once)
    jobs.stop_job("quick")
    assert runs.read_status("quick")["state"] == "stopped"
    # And a job that has ended is never marked as stopping afterwards.
    runs.write_status("quick", "finished", message="Finished.")
    assert runs.write_status("quick", "stopping", only_from=("running", "queued")) is None
    assert runs.read_status("quick")["state"] == "finished"


def test_a_job_yields_the_cpu_to_the_app(monkeypatch):
    """Jobs run at nice 10 (GLASSBOX_JOB_NICE): on a 2-core classroom server two jobs at nice 0 left
    the pages 30 s from their first byte (scripts/load_test.py)."""
    jobs.start_job(["countdown", "--steps", "400", "--delay", "0.05", "--run-id", "n1"], "n1")
    state = wait_for(lambda: (s := jobs.job_state("n1")).state == "running" and s)
    nice = int(open(f"/proc/{state.pid}/stat").read().rsplit(")", 1)[1].split()[16])
    assert nice == os.nice(0) + 10
    jobs.stop_job("n1")
