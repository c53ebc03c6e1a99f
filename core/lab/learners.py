"""Who is using a shared server: learners by name, the teacher by a key, and who may change what.

A classroom has no passwords (`classroom = true` in `.streamlit/classroom.toml`): a learner picks
a name, remembered by their browser. Runs, uploads and jobs record their owner. A run's owner
and the teacher may Stop, Resume and Delete it; everyone else may only read it (start a
fine-tuning from it, look at its figures). The teacher is whoever types `GLASSBOX_TEACHER_KEY`,
a secret kept in the server's environment and never written anywhere.

Off a classroom (the default: one person on their own laptop), and at a terminal, the one user
is `Actor.local()`, who owns everything. The checks live here, in `core`, so no page can forget
them: `jobs.stop_job`, `jobs.resume_job`, `runs.delete_run` and `data.save_upload` call them.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass

from core.lab import runs
from core.lab.errors import JobError

CLASSROOM_ENV = "GLASSBOX_CLASSROOM"
TEACHER_KEY_ENV = "GLASSBOX_TEACHER_KEY"
OWNER_FILE = runs.OWNER_FILE
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,23}")


class LearnerError(JobError):
    """A learner's name that cannot be used."""


class NotYoursError(JobError):
    """A learner tried to change a run or job that belongs to someone else."""


@dataclass(frozen=True)
class Actor:
    """Who asks: a learner's `name` (None for the laptop's one user), and whether they teach."""
    name: str | None
    teacher: bool = False

    @classmethod
    def local(cls) -> "Actor":
        return cls(None, teacher=True)

    @property
    def label(self) -> str:
        return "teacher" if self.teacher and not self.name else (self.name or "you")


def classroom_on() -> bool:
    return os.environ.get(CLASSROOM_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def learner_name(text: str) -> str:
    """A learner's name as stored: lower case, spaces as '-', 1–24 letters, digits, '-' or '_'."""
    name = re.sub(r"\s+", "-", str(text or "").strip().lower())
    if not _NAME.fullmatch(name) or name in ("teacher", "everyone", "shared"):
        raise LearnerError(f"{str(text)[:40]!r} cannot be a learner's name: use 1–24 letters, digits, '-' "
                           "or '_', starting with a letter or digit ('teacher' is taken).")
    return name


def teacher_key_set() -> bool:
    return bool(os.environ.get(TEACHER_KEY_ENV))


def is_teacher_key(typed: str) -> bool:
    """True when `typed` is the server's teacher key (compared in constant time)."""
    key = os.environ.get(TEACHER_KEY_ENV, "")
    return bool(key) and hmac.compare_digest(str(typed).encode(), key.encode())


# ---------------------------------------------------------------------------- ownership


def set_owner(run_id: str, owner: str | None) -> None:
    """Record who made a run (`None`: the laptop's user or a terminal; nothing is written)."""
    if owner is not None:
        runs.write_json_atomic(runs.run_dir(run_id) / OWNER_FILE, {"owner": learner_name(owner)})


def owner_of(run_id: str) -> str | None:
    """The learner who made `run_id`, or None (made at a terminal, or off a classroom)."""
    path = runs.run_dir(run_id) / OWNER_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        owner = runs.read_json(path).get("owner")
    except (runs.RunError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def may_change(run_id: str, actor: Actor | None) -> bool:
    """Whether `actor` may Stop, Resume or Delete `run_id`: its owner and the teacher may."""
    if actor is None or actor.teacher:
        return True
    return actor.name is not None and owner_of(run_id) == actor.name


def check_may_change(run_id: str, actor: Actor | None, action: str) -> None:
    if not may_change(run_id, actor):
        owner = owner_of(run_id)
        raise NotYoursError(f"Only {'its owner ' + repr(owner) + ' and ' if owner else ''}the teacher may "
                            f"{action} run {run_id!r}.")


def mine_first(run_ids: list[str], actor: Actor | None, everyone: bool = True) -> list[str]:
    """`run_ids` with the actor's own first (order kept within each group). Without `everyone`,
    other learners' runs are left out; shared runs (no owner: the teacher's, a terminal's) stay."""
    if actor is None or actor.name is None:
        return list(run_ids)
    owners = {r: owner_of(r) for r in run_ids}
    own = [r for r in run_ids if owners[r] == actor.name]
    shared = [r for r in run_ids if owners[r] is None]
    others = [r for r in run_ids if owners[r] not in (None, actor.name)]
    return own + shared + (others if everyone or actor.teacher else [])
