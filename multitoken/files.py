"""Reading the files users hand us: every OS, decoding and parsing error becomes one UserError line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from multitoken.errors import UserError


def os_reason(err: OSError) -> str:
    """`No such file or directory`-style text of an OS error, without the path repeated."""
    return err.strerror or type(err).__name__


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file; UserError when it is missing, unreadable or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {os_reason(err)}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


def read_json(path: str | os.PathLike, what: str, shape: type = dict) -> Any:
    """A JSON file whose top-level value is a `shape` (dict or list); UserError otherwise."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        reason = "it is empty" if not text.strip() else f"{err.msg} at line {err.lineno}"
        raise UserError(f"{what} {path} is not valid JSON: {reason}") from None
    if not isinstance(value, shape):
        expected = "an object" if shape is dict else f"a {shape.__name__}"
        raise UserError(f"{what} {path} must hold {expected}, got {type(value).__name__}")
    return value


def check_output_parent(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output path whose folder cannot be made or written."""
    parent = Path(path).absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {existing} is not writable")
