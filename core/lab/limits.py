"""What a shared server allows: the limits a classroom sets, in one place, with safe defaults.

Set by environment variables when the app is started (README, "Serving a classroom"):

| variable | default | what it bounds |
| --- | --- | --- |
| `GLASSBOX_MAX_JOB_MINUTES` | 120 | the minutes budget of a job started from the app |
| `GLASSBOX_MAX_JOB_STEPS` | 20000 | its steps budget |
| `GLASSBOX_MAX_JOB_TOKENS` | 200000000 | its tokens budget (pre-training) |
| `GLASSBOX_IMPORT_DIRS` | none | folders the app's import may read besides the downloads folder (`os.pathsep` between them) |
| `GLASSBOX_MAX_JOBS` | 1 | jobs running at once; the others queue (`core.lab.jobs`) |
| `GLASSBOX_JOB_NICE` | 10 | how much a job yields the CPU to the app's pages (`nice`; `core.lab.jobs`) |
| `GLASSBOX_MAX_JOBS_PER_LEARNER` | 2 | jobs one learner may have running or queued (`jobs.start_job`) |

The same settings can be written in `.streamlit/classroom.toml` (`core.lab.server_settings`); a
variable set in the shell wins over the file.

They bind what the app starts (`jobs.start_stage`, the page's import); a person at a terminal runs
`python -m core` as themselves and is not limited.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from core.lab.errors import JobError
from core.lab.paths import downloads_dir

DEFAULTS = {"GLASSBOX_MAX_JOB_MINUTES": 120.0, "GLASSBOX_MAX_JOB_STEPS": 20_000, "GLASSBOX_MAX_JOB_TOKENS": 200_000_000,
            "GLASSBOX_MAX_JOBS_PER_LEARNER": 2}
BUDGET_FIELDS = (("minutes", "GLASSBOX_MAX_JOB_MINUTES", "minutes"), ("steps", "GLASSBOX_MAX_JOB_STEPS", "steps"),
                 ("tokens", "GLASSBOX_MAX_JOB_TOKENS", "tokens"))
IMPORT_REFUSED = ("The app imports only from the folders this server allows (GLASSBOX_IMPORT_DIRS; by default "
                  "the downloads folder). Put the model there, or ask whoever runs the server.")


class ImportPathError(JobError):
    """An import path outside the folders the server allows (the message says nothing about the path)."""


def limit(name: str) -> float:
    """The limit `name` (an environment variable in DEFAULTS), or its default when unset or unreadable."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return float(DEFAULTS[name])
    return value if math.isfinite(value) and value > 0 else float(DEFAULTS[name])


def check_job_budget(settings) -> None:
    """Refuse a job whose budget is above the server's limits (fields a stage does not have are skipped)."""
    for field, name, unit in BUDGET_FIELDS:
        asked = getattr(settings, field, None)
        if asked is not None and asked > limit(name):
            raise JobError(f"This server allows at most {limit(name):,g} {unit} per job (you asked for "
                           f"{asked:,g}); set by {name}. Ask for less, or run it from a terminal.")


def check_job_quota(owner: str | None, active_owners: list[str | None]) -> None:
    """Refuse a learner's new job when they already have the most jobs running or queued."""
    most = int(limit("GLASSBOX_MAX_JOBS_PER_LEARNER"))
    if owner is not None and sum(o == owner for o in active_owners) >= most:
        raise JobError(f"You already have {most} job(s) running or queued, the most this server allows "
                       "one learner (GLASSBOX_MAX_JOBS_PER_LEARNER). Wait for one to end, or stop one.")


def import_dirs() -> list[Path]:
    """The folders the app's import may read: GLASSBOX_IMPORT_DIRS, and always the downloads folder
    (where the app's own GPT-2 download lands)."""
    text = os.environ.get("GLASSBOX_IMPORT_DIRS", "")
    return [Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip()] + [downloads_dir().resolve()]


def check_import_path(path) -> Path:
    """The resolved `path` when it lies inside an allowed import folder; otherwise one message that
    tells nothing about the path (whether it exists, what it holds). Links are resolved first."""
    try:
        resolved = Path(str(path)).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        raise ImportPathError(IMPORT_REFUSED) from None
    if not any(resolved == d or resolved.is_relative_to(d) for d in import_dirs()):
        raise ImportPathError(IMPORT_REFUSED)
    return resolved
