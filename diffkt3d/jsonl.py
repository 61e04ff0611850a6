"""Durable, append-only JSON-lines files: the write path shared by the preference store and the
audit log.

Why these rules (details in diffkt3d/preferences/store.py): one append = one `os.write` of the
whole line on an `O_APPEND` file, then `fsync` before the caller is told "stored"; an
inter-process file lock so appends never interleave (also on NFS); a file that does not end in a
newline (torn by a power loss) gets a newline first, so the next line never glues onto the torn
one; earlier lines are never rewritten. Readers skip and report lines that do not parse.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)


def append_json_line(path: Path, lock: FileLock, obj: dict[str, Any]) -> None:
    """Durably append `obj` as one line of `path` (returns after fsync).

    Raises:
        OSError: short write (full disk / quota); the partial line is removed again.
        filelock.Timeout: another writer held the lock for longer than the lock's timeout.
    """
    line = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    assert b"\n" not in line[:-1], "json.dumps never emits raw newlines"
    with lock:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and not _ends_with_newline(path, size):
                log.warning("%s ends in a torn line; isolating it", path)
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # only on a full disk / quota: undo our partial line
                os.ftruncate(fd, size)
                raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


def iter_json_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, raw bytes, is the unterminated last line) for every non-blank line."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    for no, raw in enumerate(lines, start=1):
        if raw.strip():
            yield no, raw, no == len(lines)


def fsync_dir(root: Path) -> None:
    """Make a new file's directory entry durable too (a fresh file can vanish otherwise)."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the data itself is fsynced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"
