"""Typed errors: a `GlassBoxError` is a mistake the user can fix.

Its message is written for a person: the page shows it with `st.error`, the command line prints it
as one line on stderr and exits with code 2. Anything else that escapes is a bug in Glass Box.
"""


class GlassBoxError(Exception):
    """A problem with the user's input or files, explained in the message."""


class DataError(GlassBoxError):
    """A data source is missing, malformed, too big, or not text."""


class TokenizerError(GlassBoxError):
    """A tokeniser cannot be trained, loaded or applied as asked."""


class ModelConfigError(GlassBoxError):
    """A model configuration that cannot be built (or does not fit in memory)."""


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


class TrainingError(GlassBoxError):
    """Training cannot start or cannot go on (bad settings, loss turned NaN, ...)."""


class JudgeError(GlassBoxError):
    """The judge endpoint or its replies failed."""
