"""The errors a user's input causes (a bad config value, an unreadable file, a corrupt checkpoint).
The CLI prints any UserError as one line, `imagelm CMD: error: ...`, and exits 2; anything else
is a bug in imagelm and keeps its traceback. Each also subclasses the builtin a caller of the
Python API would expect (ValueError, FileNotFoundError)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave imagelm. The message says what, where, and the fix."""


class ConfigError(UserError, ValueError):
    """A recipe, override or run config that is not a valid config."""


class DataError(UserError, ValueError):
    """Data that cannot be read as asked (a corrupt sample under data.strict, a folder imagelm
    will not touch, images of the wrong shape)."""


class DatasetMissing(DataError, FileNotFoundError):
    """The data is not where the config says."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: one line too, but exit code 1 (the input was valid)."""
