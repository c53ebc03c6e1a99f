"""The home page's view of the workspace: the runs of each stage, the jobs, the machine, the data.

Not a stage of its own: it reads what the stages wrote, so the home page imports nothing below
the stages.
"""

from __future__ import annotations

from core.lab import data, device, jobs, paths, runs


def workspace() -> dict:
    """Every run (newest first), the active jobs by run id, and the damaged runs."""
    all_runs = runs.list_runs()
    return {"runs": all_runs, "active": {s.run_id: s for s in jobs.active_jobs()},
            "broken": [r for r in all_runs if r.error]}


def jobs_active() -> bool:
    """Whether any job is queued or running (the home page polls faster while one is)."""
    return bool(jobs.active_jobs())


def machine() -> dict:
    return device.describe()


def folders() -> dict:
    return {"checkpoints": paths.checkpoints_dir(), "downloads": paths.downloads_dir(),
            "search": paths.search_dirs()}


def data_sources() -> list[dict]:
    return data.list_sources()
