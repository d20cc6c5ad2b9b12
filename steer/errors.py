"""The library's own error types: every mistake a user can fix is one of these, with a message
that names the input and what to do (the CLI prints it as one line)."""
from __future__ import annotations


class SteerError(ValueError):
    """Bad input to steer: an unknown layer, a malformed file, a spec for another model, ..."""


class SpecError(SteerError):
    """A spec that is malformed or does not fit the model it is applied to."""


class MissingFileError(SteerError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for code catching that)."""


class ModelLoadError(SteerError, OSError):
    """A model that cannot be loaded from what the user named (still an OSError for code catching that)."""
