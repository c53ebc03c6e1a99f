"""The run store: every trained thing lives in `checkpoints/<run-id>/` as plain, safe files.

A run is self-describing, so it can be copied to another machine and opened there:

    config.json            stage, parent run, tokenizer, model and training config
    status.json            reserved / queued / running / stopping / stopped / finished / failed
    model.safetensors      weights (safetensors: tensors only, nothing is ever unpickled)
    train_state.*          optimiser tensors + JSON counters, for exact resume
    metrics.jsonl          one JSON object per logged step
    samples.jsonl          generated text along the way
    tokenizer.json         the tokeniser, so the run needs no other file
    job.log                what the background job printed

Every write is atomic (write a temp file in the same folder, fsync, `os.replace`), so a process
killed mid-write leaves the previous version intact. The one exception is the append-only jsonl
logs, whose readers skip a truncated last line.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.lab.errors import CorruptRunError, RunError, RunExistsError, RunNotFoundError
from core.lab.paths import checkpoints_dir

JOB_RUN_ID_ENV = "GLASSBOX_JOB_RUN_ID"  # set inside a background job: the run it may take over
STARTED_IN_THIS_PROCESS: list[str] = []  # runs this process created outside a job
_command_line = False  # True in `python -m core`: see started_from_command_line()
OWNER_FILE = "owner.json"  # {"owner": learner}: who made the run on a classroom server (core.lab.learners)
STAGES = ("tokenizer", "import", "pretrain", "classify", "instruct", "judge", "prefer")
TERMINAL_STATES = ("stopped", "finished", "failed")

# Letters, digits, '.', '_' and '-'; starts with a letter or digit (so '.cache' or '_jobs' are
# never runs); 64 characters at most. No separators, so an id can never leave checkpoints/.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise RunError(
            f"{run_id!r} is not a valid run id: use 1–64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return run_id


def run_dir(run_id: str) -> Path:
    path = checkpoints_dir() / validate_run_id(run_id)
    if path.is_symlink():  # a planted link could point anywhere on the machine
        raise RunError(f"checkpoints/{run_id} is a symbolic link; a run must be a real folder.")
    return path


def new_run_id(prefix: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{prefix}-{stamp}"
    run_id, n = base, 1
    while run_dir(run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


# ---------------------------------------------------------------------------- atomic files


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean(obj: Any) -> Any:
    """NaN and infinity are not JSON: store them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def open_append(path: Path, binary: bool = False):
    """Open a run's file for appending without following a symlink planted in its place: a run
    folder copied from elsewhere must never make the server write outside the run store."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptRunError(f"{path} is a symbolic link; Glass Box never writes through one.") from None
        raise
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding="utf-8")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(_clean(obj), indent=2, default=_json_default, allow_nan=False)
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptRunError(f"{path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptRunError(f"{path} is damaged and cannot be read ({e}).") from None


def append_jsonl(path: Path, record: dict) -> None:
    line = json.dumps(_clean(record), default=_json_default, allow_nan=False) + "\n"
    with open_append(path) as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """All complete records; a damaged line (e.g. cut off by a crash) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (the previous file survives a crash mid-save)."""
    from safetensors.torch import save  # heavy: imports torch, which `python -m core data` never needs

    # safetensors refuses shared or non-contiguous storage: give it plain copies.
    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    data = save(plain, metadata={k: str(v) for k, v in (metadata or {}).items()})
    write_bytes_atomic(path, data)


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError  # heavy (torch): loaded only when tensors are read
    from safetensors.torch import load  # heavy: imports torch

    path = Path(path)
    if not path.is_file():
        raise CorruptRunError(f"{path} is missing.")
    try:
        return load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CorruptRunError(f"{path} is damaged and cannot be loaded ({e}).") from None


def tensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open  # heavy (torch): only when a header is read

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CorruptRunError(f"{path} is damaged and cannot be loaded ({e}).") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the file's header alone (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open  # heavy (torch): only when a header is read

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError:
        raise CorruptRunError(f"{path} is missing.") from None
    except (SafetensorError, OSError) as e:
        raise CorruptRunError(f"{path} is damaged and cannot be loaded ({e}).") from None


# ---------------------------------------------------------------------------- runs


@dataclass
class Run:
    id: str
    path: Path
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    error: str | None = None  # set when a file of the run is damaged

    @property
    def stage(self) -> str | None:
        return self.config.get("stage")

    @property
    def parent(self) -> str | None:
        return self.config.get("parent")

    @property
    def state(self) -> str:
        return self.status.get("state", "unknown")

    @property
    def created(self) -> str:
        return self.config.get("created", "")

    def file(self, name: str) -> Path:
        return self.path / name

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def samples(self) -> list[dict]:
        return read_jsonl(self.path / "samples.jsonl")

    def has_weights(self) -> bool:
        return (self.path / "model.safetensors").is_file()


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def reserve_run(run_id: str) -> Path:
    """Claim a run id atomically (one `mkdir`): of two sessions asking at once, one wins."""
    path = run_dir(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.") from None
    write_json_atomic(path / "status.json", {"state": "reserved", "updated": _now()})
    return path


def create_run(run_id: str, stage: str, config: dict, parent: str | None = None,
               resume: bool = False) -> Run:
    """Create the run's folder and config.json (or reopen it with `resume=True`)."""
    if stage not in STAGES:
        raise RunError(f"Unknown stage {stage!r}; stages are {', '.join(STAGES)}.")
    if parent is not None:
        validate_run_id(parent)
    path = run_dir(run_id)
    if (path / "config.json").exists():
        if resume:
            if os.environ.get(JOB_RUN_ID_ENV) != run_id and _command_line:
                _record_command_line_run(run_id)  # resumed from a shell: running again, our pid
            return open_run(run_id)
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    if resume and not path.exists():
        raise RunNotFoundError(f"There is no run {run_id!r} to resume.")
    if os.environ.get(JOB_RUN_ID_ENV) != run_id:
        reserve_run(run_id)  # atomic: of two sessions creating the same id, one is refused
    # else: the folder was reserved by start_job for the background job we are running in.
    full = {"stage": stage, "parent": parent, "created": _now(), **config}
    write_json_atomic(path / "config.json", full)
    if os.environ.get(JOB_RUN_ID_ENV) != run_id and _command_line:
        # Started from a shell, not as a job. (In the app's own process a run is written at once
        # through `quick_run`, never left "running".)
        _record_command_line_run(run_id)
    return open_run(run_id)


def _record_command_line_run(run_id: str) -> None:
    """Record our pid so the app can tell the run is alive; `python -m core` marks it finished /
    stopped / failed when the command ends (`finish_runs_started_here`)."""
    clear_stop(run_id)
    write_status(run_id, "running", pid=os.getpid(), pid_start=process_start(os.getpid()),
                 message="Running from the command line.")
    if run_id not in STARTED_IN_THIS_PROCESS:
        STARTED_IN_THIS_PROCESS.append(run_id)


def started_from_command_line(on: bool = True) -> None:
    """`python -m core` calls this first (and with False when it returns): the runs it creates
    outside a job record its pid, and `finish_runs_started_here` records how the command ended."""
    global _command_line
    _command_line = on


@contextmanager
def quick_run(run_id: str, stage: str, config: dict, parent: str | None = None, owner: str | None = None):
    """Create a run that is written at once, in this process (a tokeniser, an import).

    On success its status says finished; on any error the half-written folder is removed, so a
    failure partway never leaves a "running" job in every sidebar. Yields the new `Run`. `owner`
    (a learner's checked name, `core.lab.learners`) is recorded before anything else is written.
    """
    run = create_run(run_id, stage, config, parent=parent)
    if owner is not None:
        write_json_atomic(run.path / OWNER_FILE, {"owner": owner})
    try:
        yield run
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        if run_id in STARTED_IN_THIS_PROCESS:
            STARTED_IN_THIS_PROCESS.remove(run_id)
        raise
    write_status(run_id, "finished", message="Finished.")


def process_start(pid: int) -> str | None:
    """A process's start time from /proc (tells a reused pid apart), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def finish_runs_started_here(error: str | None = None, stopped: bool = False) -> None:
    """Record how a command-line run ended (a background job's runner does this for jobs)."""
    for run_id in STARTED_IN_THIS_PROCESS:
        if read_status(run_id).get("state") not in ("running", "reserved", "stopping"):
            continue  # the command recorded its own end
        if error:
            write_status(run_id, "failed", error=error, message=error)
        elif stopped or stop_requested(run_id):
            clear_stop(run_id)
            write_status(run_id, "stopped", message="Stopped; checkpoint saved.")
        else:
            write_status(run_id, "finished", message="Finished.")
    STARTED_IN_THIS_PROCESS.clear()


def update_config(run_id: str, **fields: Any) -> dict:
    path = run_dir(run_id) / "config.json"
    config = read_json(path)
    config.update(fields)
    write_json_atomic(path, config)
    return config


def open_run(run_id: str) -> Run:
    path = run_dir(run_id)
    if not path.is_dir():
        raise RunNotFoundError(f"There is no run {run_id!r}.")
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or "stage" not in config:
        raise CorruptRunError(f"{path / 'config.json'} does not describe a run (no 'stage').")
    return Run(run_id, path, config, read_status(run_id))


def list_runs(stage: str | tuple[str, ...] | None = None) -> list[Run]:
    """All runs, newest first. A damaged run is listed with `.error` set instead of raising."""
    root = checkpoints_dir()
    if not root.is_dir():
        return []
    stages = (stage,) if isinstance(stage, str) else stage
    runs = []
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir() or not _RUN_ID.fullmatch(path.name) or ".." in path.name:
            continue
        if not (path / "config.json").exists():
            continue  # reserved by a job that has not written its config yet
        try:
            run = open_run(path.name)
        except RunError as e:
            run = Run(path.name, path, {}, {}, error=str(e))
        if stages and run.stage not in stages:
            continue
        runs.append(run)
    runs.sort(key=lambda r: (r.created, r.path.stat().st_mtime), reverse=True)
    return runs


def delete_run(run_id: str) -> None:
    path = run_dir(run_id)
    if not path.is_dir():
        raise RunNotFoundError(f"There is no run {run_id!r}.")
    shutil.rmtree(path)


# ---------------------------------------------------------------------------- status


def read_status(run_id: str) -> dict:
    path = run_dir(run_id) / "status.json"
    if not path.exists():
        return {}
    try:
        status = read_json(path)
    except CorruptRunError as e:
        return {"state": "unknown", "message": str(e)}
    return status if isinstance(status, dict) else {}


@contextmanager
def _status_lock(run_id: str):
    """Hold an exclusive lock for a read-modify-write of status.json.

    The job and the app both write it (the job: running, finished; the app: stopping). Without the
    lock the app could read "running", the job then write "stopped" and exit, and the app write
    "stopping" over it: a dead process that never said it ended, reported as a crash.
    """
    with open_append(run_dir(run_id) / "status.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def write_status(run_id: str, state: str | None, only_from: tuple[str, ...] | None = None,
                 **fields: Any) -> dict | None:
    """Set a run's state (None: keep it) and fields in status.json, atomically and under a lock.

    With `only_from`, nothing changes unless the current state is one of those states (returns None):
    the app uses it so that a stop request can never overwrite how a job ended.
    """
    with _status_lock(run_id):
        status = read_status(run_id)
        current = status.get("state")
        if only_from is not None and current not in only_from:
            return None
        state = current if state is None else state
        if current != state and "message" not in fields:
            status.pop("message", None)  # the old state's message no longer applies
        status.update(fields)
        status["state"] = state
        status["updated"] = _now()
        status["updated_ts"] = time.time()
        write_json_atomic(run_dir(run_id) / "status.json", status)
        return status


def request_stop(run_id: str) -> None:
    write_json_atomic(run_dir(run_id) / "stop.request", {"requested": _now()})  # replaces, never follows


def clear_stop(run_id: str) -> None:
    (run_dir(run_id) / "stop.request").unlink(missing_ok=True)


def stop_requested(run_id: str) -> bool:
    return (run_dir(run_id) / "stop.request").exists()
