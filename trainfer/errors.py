"""The one exception type a user can cause: the CLI prints its message and exits 1, without a traceback;
and the checks of a user's input that every command shares."""

from __future__ import annotations

import os
from pathlib import Path


class TrainferError(Exception):
    """A problem with the user's input (a path, a file, a flag): the message says what to do."""


def new_directory(path: str | os.PathLike[str]) -> Path:
    """An output directory that is new or empty, else a TrainferError: no command overwrites another's
    files. Called before the expensive work, so a wrong --out fails at once."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainferError(f"{out} exists and is not empty; choose a new directory")
    return out
