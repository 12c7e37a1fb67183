"""The expected failures: what a user's input can get wrong, one type per kind of input. `train/main.py` prints
any of them as one line (exit 2, no traceback; `--debug` or DISTILL_DEBUG=1 shows it); every other exception
is a bug and keeps its traceback. Each message names the bad value or file and the fix.

The rooms below train/ (model/, kernels/, train/data/, train/teachers/) raise plain ValueError at their own
boundaries (they are libraries too); the trainer turns those into the typed errors here where it calls them.
"""
import contextlib


class UserError(ValueError):
    """Bad input; the message names the culprit and the fix."""


class ConfigError(UserError):
    """A configuration that cannot run: a key, a value, a combination of settings."""


class ModelDirError(UserError):
    """An HF model directory that cannot be used: config.json, weight files, tokenizer."""


class DataError(UserError):
    """Rows, a prepared/packed dataset: the file and the line or row."""


class StoreError(UserError):
    """A top-k store that does not belong to this run or is damaged."""


class CheckpointError(UserError):
    """A checkpoint to resume or export that is missing or damaged."""


class RunDirError(UserError):
    """A run directory that cannot be written."""


class DivergedError(UserError, RuntimeError):
    """Training stopped after too many non-finite steps in a row (the last checkpoint is intact)."""


@contextlib.contextmanager
def reraise_as(kind: type[UserError], prefix: str = ""):
    """Turn the ValueError a room raises at its boundary for bad input into the trainer's typed error `kind`.
    Wrap only calls whose ValueErrors are documented as input errors (loading rows, a model directory, a store)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise kind(f"{prefix}{e}") from e
