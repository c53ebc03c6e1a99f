"""Typed errors: a `GlassBoxError` is a mistake the user can fix.

Its message is written for a person: the page shows it with `st.error`, the command line prints it
as one line on stderr and exits with code 2. Anything else that escapes is a bug in Glass Box.
"""


class GlassBoxError(Exception):
    """A problem with the user's input or files, explained in the message."""


class TokenizerError(GlassBoxError):
    """A tokeniser cannot be trained, loaded or applied as asked."""


class ModelConfigError(GlassBoxError):
    """A model configuration that cannot be built (or does not fit in memory)."""


class TrainingError(GlassBoxError):
    """Training cannot start or cannot go on (bad settings, loss turned NaN, ...)."""


class DataError(GlassBoxError):
    """A data source is missing, malformed, too big, or not text."""
