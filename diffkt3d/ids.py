"""Ids that become file or folder names: case ids, candidate ids, label tags.

The server, the datastore and the preference store all build paths from ids sent by clients, so
one strict pattern decides what an id may be before it touches the file system (no separators, no
"..", bounded length).
"""

from __future__ import annotations

import re
from typing import Any

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(value: Any, what: str) -> str:
    """Return `value` if it is a safe id (folder-like name), else raise ValueError naming `what`."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a valid id (letters, digits, '.', '_', '-'; "
                         "no path separators or '..'; at most 128 characters)")
    return value


__all__ = ["check_id"]
