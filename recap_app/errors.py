"""Errors in what the user gave (config, data, checkpoint URLs): command-line mains end with the message.

A wrong override, a data URL with no Parquet files, a file that does not match the schema or a
checkpoint of another model is the user's to fix, and the message says what; a traceback into recap's
internals would only hide it. Every such error derives from InputError; anything else, builtin
exceptions raised by recap's own bugs included, keeps its traceback. Imports nothing of recap's so every
module can raise these.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class InputError(Exception):
    """Something the user gave cannot be used; the message names it and says what to change."""

    #: Met alike by every rank (a config error: every rank reads the same config), so only rank 0 says it.
    every_rank = False


class FaultError(Exception):
    """The run's environment failed in a way recap recognises (a rank stopped or vanished); the message
    names it, and a scheduler retry resumes from the last checkpoint."""


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an InputError or a FaultError into `recap: error: <message>` and exit status 1 (under
    torchrun, on each rank that meets it; on rank 0 alone for errors every rank meets)."""
    try:
        yield
    except (InputError, FaultError) as e:
        if getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0":
            raise SystemExit(1) from None  # rank 0 says it once, not once per process
        raise SystemExit(f"recap: error: {e}") from None


class SubmitError(SystemExit):
    """A job that cannot work as submitted (a container without an image, an output that would vanish
    with it). Raised by the TorchX components and schedulers at submit time: the `torchx` CLI prints a
    SystemExit's message alone, where any other exception would end in a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"recap: error: {message}")
