"""Typed errors of the machinery: data, the run store, jobs and the judge client.

They are `GlassBoxError`s (`core.gpt.errors`), so the page and the CLI show their message as is.
"""

from core.gpt.errors import DataError, GlassBoxError  # DataError: the textbook parses data too

__all__ = ["DataError", "GlassBoxError", "RunError", "RunExistsError", "RunNotFoundError",
           "CorruptRunError", "JobError", "JudgeError"]


class RunError(GlassBoxError):
    """A problem with a run in the run store."""


class RunExistsError(RunError):
    """The run id is already taken."""


class RunNotFoundError(RunError):
    """No run with that id."""


class CorruptRunError(RunError):
    """A file of a run is unreadable; the message names the file."""


class JobError(GlassBoxError):
    """A background job cannot be started, stopped or resumed."""


class JudgeError(GlassBoxError):
    """The judge endpoint or its replies failed."""

