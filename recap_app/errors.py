"""Errors in what the user gave (config, data, checkpoint URLs): command-line mains end with the message.

A wrong override, a data URL with no Parquet files, a file that does not match the schema or a
checkpoint of another model is the user's to fix, and the message says what; a traceback into recap's
internals would only hide it. Anything else keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from recap_app.checkpoint import CheckpointMismatchError
from recap_app.config import ConfigError
from recap_app.data import DataError

INPUT_ERRORS = (ConfigError, DataError, CheckpointMismatchError, FileNotFoundError)


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an INPUT_ERRORS exception into `recap: error: <message>` and exit status 1 (under torchrun,
    on each rank that meets it)."""
    try:
        yield
    except INPUT_ERRORS as e:
        raise SystemExit(f"recap: error: {e}") from None
