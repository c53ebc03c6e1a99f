"""The teacher's view of a classroom server: everyone's progress, a leaderboard, report cards.

    python -m core classroom                                  # {"learners": [...], "leaderboard": {...}, "jobs": [...]}
    python -m core classroom --report ada --out ada.html      # one learner's report card

Read-only: it lists the run store (`core.lab.classroom`); stopping a job is `core.lab.jobs`'s,
with the teacher as the actor. The leaderboard compares runs at one budget (the settings file's
`leaderboard_minutes`), since a loss after 5 minutes and one after 50 are not a contest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.gpt.errors import GlassBoxError
from core.lab import classroom, jobs, learners, runs
from core.lab.cli import option
from core.lab.errors import JobError

COMMAND = "classroom"
LEADERBOARD_MINUTES_ENV = "GLASSBOX_LEADERBOARD_MINUTES"
STAGE_COLUMNS = classroom.STAGE_COLUMNS
Actor, NotYoursError = learners.Actor, learners.NotYoursError
CODE = {"leaderboard": (classroom.leaderboard,), "progress": (classroom.progress, classroom.headline)}


@dataclass
class Settings:
    report: str | None = option(None, metavar="LEARNER", help="write this learner's report card (HTML)")
    out: str | None = option(None, metavar="FILE", help="where the report card goes (default: <learner>-report.html)")
    minutes: float | None = option(None, help="the leaderboard's pre-training budget (default: the settings file's)")


def leaderboard_minutes() -> float:
    try:
        value = float(os.environ.get(LEADERBOARD_MINUTES_ENV, "") or 5)
    except ValueError:
        return 5.0
    return value if value > 0 else 5.0


def run(settings: Settings, progress=None) -> dict:
    """Everyone's progress, the leaderboard and the jobs; with `--report`, one report card."""
    minutes = settings.minutes or leaderboard_minutes()
    out = {"learners": classroom.progress(), "leaderboard": classroom.leaderboard(minutes), "minutes": minutes,
           "jobs": [{"run_id": s.run_id, "owner": s.owner, "command": s.command, "state": s.state}
                    for s in jobs.active_jobs()]}
    if settings.report:
        name = learners.learner_name(settings.report)
        path = Path(settings.out or classroom.report_filename(name))
        runs.write_bytes_atomic(path.resolve(), classroom.report_card(name).encode("utf-8"))
        out["path"] = str(path)
    return out


def learner_names() -> list[str]:
    """Every learner who owns a run, sorted."""
    return sorted({row["learner"] for row in classroom.progress() if row.get("learner")})


def follow(learner: str) -> str | None:
    """The run projector mode shows for `learner`: their newest active job, else their newest run."""
    active = [s.run_id for s in jobs.active_jobs() if s.owner == learner]
    if active:
        return active[-1]
    theirs = [r.id for r in runs.list_runs() if not r.error and learners.owner_of(r.id) == learner]
    return theirs[0] if theirs else None


def _cell(entries: list[dict]) -> str:
    """One table cell: the newest run's headline figure, and how many runs there are."""
    if not entries:
        return ""
    newest = entries[0]
    figure = f"{newest['label']} {classroom.format_value(newest['label'], newest['value'])}" if newest["label"] else ""
    more = f" (+{len(entries) - 1})" if len(entries) > 1 else ""
    return f"{newest['run_id']}: {figure or newest['state']}{more}"


def progress_table() -> list[dict]:
    """`classroom.progress()` as rows for a table: learner, one column per stage, jobs now."""
    table = []
    for row in classroom.progress():
        cells = {f"{n}. {title}": _cell(row["stages"][n]) for n, title, stages in STAGE_COLUMNS if stages}
        table.append({"learner": row["name"], **cells, "reached stage": row["reached"] or "—",
                      "jobs now": f"{row['running']} running, {row['queued']} queued" if row["active_jobs"] else ""})
    return table


def run_headline(run_id: str) -> dict:
    """What projector mode shows of one run: its headline figure, step, state and curves."""
    try:
        run = runs.open_run(run_id)
    except GlassBoxError:  # a job still starting has no config yet
        return {"run_id": run_id, "stage": "starting", "label": None, "value": None, "step": None,
                "state": jobs.job_state(run_id).state, "metrics": []}
    label, value = classroom.headline(run)
    metrics = run.metrics()
    return {"run_id": run_id, "stage": run.stage, "label": label, "value": value,
            "step": metrics[-1].get("step") if metrics else None, "state": jobs.job_state(run_id).state,
            "metrics": classroom.downsample(metrics)}


active_jobs, leaderboard, report_card, report_filename = (jobs.active_jobs, classroom.leaderboard,
                                                          classroom.report_card, classroom.report_filename)
__all__ = ["GlassBoxError", "JobError", "Settings", "run"]
