"""Long tasks (training, judging) run in child processes, not in the Streamlit script.

Why a child process: training inside the Streamlit process freezes the page (importing torch
alone holds the GIL for ~2 s), dies with the server, and cannot be stopped cleanly. A child
process started in its own session keeps running across reruns, page changes, browser reloads
and even a restart of the Streamlit server; everything it does is written into its run folder,
which any page (or the command line) reads.

The life of a job:

    start_job(argv, run_id)   reserve the run id, write job.json, spawn `python -m core job`
      └─ child: queued        wait for a free slot (GLASSBOX_MAX_JOBS, default 1)
         child: running       run the CLI command `argv` in-process, output → job.log
         child: finished | stopped | failed    (status.json says which, with the error)
    stop_job(run_id)          drop a stop.request file: the loop saves a checkpoint and returns
    resume_job(run_id)        run the same argv again with --resume

Slots are `flock` locks on files in `checkpoints/.jobs/`: the kernel releases a lock when its
holder dies, even by SIGKILL, so a crashed job never blocks the queue.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.lab import cli, learners, limits, runs
from core.gpt.errors import GlassBoxError
from core.lab.errors import JobError, RunError
from core.lab.paths import REPO_ROOT, checkpoints_dir

ACTIVE_STATES = ("reserved", "queued", "running", "stopping")
LOG_TAIL_LINES = 40
SECRET_ENV = ("OPENAI_API_KEY", "GLASSBOX_JUDGE_API_KEY")  # never inherited by a job
_children: dict[str, subprocess.Popen] = {}  # reaped on each look, so no zombies linger


def job_niceness() -> int:
    """How much a job yields the CPU to the app (`nice`, 0–19; GLASSBOX_JOB_NICE, default 10)."""
    try:
        return min(19, max(0, int(os.environ.get("GLASSBOX_JOB_NICE", "10"))))
    except ValueError:
        return 10


def max_jobs() -> int:
    try:
        return max(1, int(os.environ.get("GLASSBOX_MAX_JOBS", "1")))
    except ValueError:
        return 1


@dataclass
class JobState:
    run_id: str
    state: str  # reserved, queued, running, stopping, stopped, finished, failed, unknown
    message: str = ""
    pid: int | None = None
    alive: bool = False
    error: str | None = None
    result: dict | None = None
    argv: list[str] = field(default_factory=list)
    log_tail: str = ""
    updated_ts: float | None = None
    owner: str | None = None  # the learner who started it (None: a terminal, or off a classroom)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv else ""


# ---------------------------------------------------------------------------- starting


def _spawn(run_id: str, env: dict[str, str] | None) -> subprocess.Popen:
    path = runs.run_dir(run_id)
    # Secrets stay with the job that asked for them (`env`): a pre-training job never inherits
    # the server's judge key (issue 22).
    child_env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    child_env.update(env or {})
    child_env["PYTHONUNBUFFERED"] = "1"
    # The child must find `core` however the parent was started (streamlit, pytest, a script).
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO_ROOT), child_env.get("PYTHONPATH", "")] if p
    )
    log = runs.open_append(path / "job.log", binary=True)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core", "job", "--run-id", run_id],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=child_env, start_new_session=True,  # its own session: outlives the server
        )
    finally:
        log.close()
    _children[run_id] = proc
    runs.write_status(run_id, "queued", pid=proc.pid, pid_start=runs.process_start(proc.pid),
                      message="Starting…", error=None)
    return proc


def start_job(argv: list[str], run_id: str, env: dict[str, str] | None = None,
              owner: str | None = None) -> JobState:
    """Start `python -m core <argv>` as a background job writing into run `run_id`.

    `env` adds variables to the child's environment only (an API key travels this way: it is
    never written to job.json, status.json or the log). `owner` is the learner starting it: the
    job and its run are theirs, within their quota of jobs (core/lab/limits.py).
    """
    if not argv:
        raise JobError("No command given for the job.")
    with _quota_lock():  # two clicks at once cannot both pass the quota
        if owner is not None:
            owner = learners.learner_name(owner)
            limits.check_job_quota(owner, [s.owner for s in active_jobs()])
        runs.reserve_run(run_id)  # raises RunExistsError: one of two same-name starts wins
        learners.set_owner(run_id, owner)
    runs.write_json_atomic(runs.run_dir(run_id) / "job.json",
                           {"argv": list(argv), "created": time.time()})
    _spawn(run_id, env)
    return job_state(run_id)


def start_stage(command: str, settings, run_id: str, env: dict[str, str] | None = None,
                owner: str | None = None) -> JobState:
    """Start stage `command` (`python -m core <command>`) with its typed `settings` as a job.

    The job's command line is written from the settings dataclass (`core.lab.cli.to_argv`), so no
    page builds one by hand, and `--run-id` is the job's own run id.
    """
    limits.check_job_budget(settings)  # a shared server's longest job (core/lab/limits.py)
    argv = [command] + cli.to_argv(settings)
    if "--run-id" not in argv:
        argv += ["--run-id", run_id]
    return start_job(argv, run_id, env=env, owner=owner)


def resume_job(run_id: str, env: dict[str, str] | None = None,
               actor: learners.Actor | None = None) -> JobState:
    """Run a stopped or failed job's command again with --resume (it continues from its checkpoint).
    `actor`, when given, must be the run's owner or the teacher."""
    learners.check_may_change(run_id, actor, "resume")
    state = job_state(run_id)
    if state.active:
        raise JobError(f"Run {run_id!r} is still {state.state}; stop it before resuming.")
    job_file = runs.run_dir(run_id) / "job.json"
    if not job_file.is_file():
        raise JobError(f"Run {run_id!r} was not started as a job, so it cannot be resumed here.")
    job = runs.read_json(job_file)
    argv = list(job["argv"])
    if "--resume" not in argv:
        argv.append("--resume")
    runs.write_json_atomic(job_file, {**job, "argv": argv})
    runs.clear_stop(run_id)
    _spawn(run_id, env)
    return job_state(run_id)


def stop_job(run_id: str, force: bool = False, actor: learners.Actor | None = None) -> JobState:
    """Ask a job to stop: it saves a checkpoint and ends. `force` kills it at once. `actor`, when
    given, must be the run's owner or the teacher."""
    learners.check_may_change(run_id, actor, "stop")
    state = job_state(run_id)
    if not state.active:
        return state
    # "stopping" first, then the request: the job sees the request only after "stopping" is written,
    # so its own last word (stopped, finished, failed) always comes after ours.
    runs.write_status(run_id, "stopping", only_from=("running", "queued"),
                      message="Stopping: saving a checkpoint…")
    runs.request_stop(run_id)
    if force and state.pid and state.alive:
        try:
            os.killpg(state.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        runs.write_status(run_id, "stopped", only_from=ACTIVE_STATES,
                          message="Killed; the last checkpoint is kept.")
    return job_state(run_id)


def delete_run(run_id: str, actor: learners.Actor | None = None) -> None:
    """Delete a run and everything in it: only its owner or the teacher, and never while its job runs."""
    learners.check_may_change(run_id, actor, "delete")
    if job_state(run_id).active:
        raise JobError(f"Run {run_id!r} is still running; stop it before deleting it.")
    runs.delete_run(run_id)


# ---------------------------------------------------------------------------- watching


def _alive(pid: int | None, pid_start: str | None) -> bool:
    if not pid:
        return False
    for run_id, child in list(_children.items()):
        if child.pid == pid and child.poll() is not None:
            del _children[run_id]  # reaped: it has ended
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie has finished
    except (OSError, IndexError):
        return True
    return pid_start is None or runs.process_start(pid) == pid_start


def log_tail(run_id: str, lines: int = LOG_TAIL_LINES) -> str:
    path = runs.run_dir(run_id) / "job.log"
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def job_state(run_id: str) -> JobState:
    """What a run's job is doing now, read from disk; a dead process is reported as failed."""
    path = runs.run_dir(run_id)
    if not path.is_dir():
        raise RunError(f"There is no run {run_id!r}.")
    status = runs.read_status(run_id)
    job_file = path / "job.json"
    argv = []
    if job_file.is_file():
        try:
            argv = runs.read_json(job_file).get("argv", [])
        except GlassBoxError:
            argv = []
    state = JobState(
        run_id=run_id, state=status.get("state", "unknown"), message=status.get("message", ""),
        pid=status.get("pid"), error=status.get("error"), result=status.get("result"),
        argv=argv, updated_ts=status.get("updated_ts"), owner=learners.owner_of(run_id),
    )
    state.alive = _alive(state.pid, status.get("pid_start"))
    stale_reservation = state.state == "reserved" and not state.pid and (
        time.time() - (state.updated_ts or path.stat().st_mtime) > 30)
    if (state.active and state.pid and not state.alive) or stale_reservation:
        # The process is gone without saying how it ended: killed, out of memory, power cut.
        state.state = "failed"
        state.error = state.error or "The job ended unexpectedly (it was killed or crashed)."
        state.message = state.error + " The last checkpoint is kept; you can resume."
    if state.state in ("failed",) or state.active:
        state.log_tail = log_tail(run_id)
    return state


def active_jobs() -> list[JobState]:
    """Jobs that are queued or running now, oldest first."""
    root = checkpoints_dir()
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not (path / "status.json").is_file():
            continue
        try:
            # Polled every few seconds by every open page: skip finished runs cheaply, and only
            # build the full state (liveness check, log tail) for the few that may be active.
            if runs.read_status(path.name).get("state") not in ACTIVE_STATES:
                continue
            state = job_state(path.name)
        except GlassBoxError:
            continue
        if state.active:
            found.append(state)
    found.sort(key=lambda s: s.updated_ts or 0)
    return found


# ---------------------------------------------------------------------------- the child side


@contextmanager
def _quota_lock():
    with open(_slot_dir() / "quota.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _slot_dir() -> Path:
    path = checkpoints_dir() / ".jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_take_slot():
    """An open, locked slot file, or None when every slot is held by a running job."""
    for i in range(max_jobs()):
        f = open(_slot_dir() / f"slot-{i}.lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError as e:
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
    return None


def _wait_for_slot(run_id: str):
    while True:
        slot = _try_take_slot()
        if slot is not None:
            return slot
        if runs.stop_requested(run_id):
            return None
        running = [s.run_id for s in active_jobs() if s.state in ("running", "stopping")]
        runs.write_status(
            run_id, "queued", only_from=("queued", "reserved"), pid=os.getpid(),
            message=(f"Queued: waiting for a free slot ({len(running)} job(s) running: "
                     f"{', '.join(running) or '…'}; limit {max_jobs()}, set by GLASSBOX_MAX_JOBS)."),
        )
        time.sleep(1.0)


def run_job(run_id: str, run_command) -> int:
    """Body of `python -m core job --run-id ID`: queue, run the stored command with `run_command`
    (the dispatcher's, handed down so the machinery never imports the command line), record the end."""
    runs.validate_run_id(run_id)
    argv = runs.read_json(runs.run_dir(run_id) / "job.json")["argv"]
    # Training takes what the pages leave: two jobs on a 2-core server otherwise held both cores,
    # and 20 learners' pages waited over 30 s for their first byte (scripts/load_test.py).
    os.nice(job_niceness())
    slot = _wait_for_slot(run_id)
    if slot is None:
        runs.clear_stop(run_id)
        runs.write_status(run_id, "stopped", message="Stopped before it started.", pid=None)
        return 0
    os.environ[runs.JOB_RUN_ID_ENV] = run_id  # lets the command take over the reserved folder
    # SIGTERM (e.g. `kill`, a shutting-down server) asks for a clean stop, like the Stop button.
    signal.signal(signal.SIGTERM, lambda *_: runs.request_stop(run_id))
    runs.write_status(run_id, "running", pid=os.getpid(), pid_start=runs.process_start(os.getpid()),
                      message=f"Running: python -m core {' '.join(argv[:1])}", error=None,
                      started_ts=time.time())
    print(f"[job] {time.strftime('%H:%M:%S')} running: python -m core {' '.join(argv)}", flush=True)
    try:
        result = run_command(argv)
    except GlassBoxError as e:
        print(f"[job] error: {e}", flush=True)
        runs.write_status(run_id, "failed", error=str(e), message=str(e))
        return 2
    except OSError as e:  # the disk is full or a file vanished: say so plainly, keep the details in the log
        traceback.print_exc()
        where = f" ({e.filename})" if e.filename else ""
        message = (f"A file could not be written or read: {e.strerror or e}{where}. The last checkpoint is "
                   "kept; if the disk is full, free some space and resume.")
        runs.write_status(run_id, "failed", error=message, message=message)
        return 1
    except BaseException as e:  # a bug: keep the traceback in the log, a short line in status
        traceback.print_exc()
        message = f"Internal error: {type(e).__name__}: {e}"
        runs.write_status(run_id, "failed", error=message, message=message)
        return 1
    finally:
        slot.close()
    stopped = runs.stop_requested(run_id) or bool((result or {}).get("stopped"))
    runs.clear_stop(run_id)
    print(f"[job] result: {result}", flush=True)
    runs.write_status(run_id, "stopped" if stopped else "finished", result=result,
                      message="Stopped; checkpoint saved. Resume to continue." if stopped else "Finished.")
    return 0
