"""Exceptions that carry a user-facing message naming the case, file and problem.

The CLI and the server turn these into one line / a 4xx response; anything else escaping is a bug.
"""

from __future__ import annotations


class DiffKT3DError(Exception):
    """Base class for errors caused by user input (bad files, bad config, bad request)."""


class CaseError(DiffKT3DError):
    """A case (folder, DICOM series, npz ...) cannot be used as given.

    Args:
        message: what is wrong, with expected vs found where it helps.
        case: case id or folder.
        file: the offending file, if one.
    """

    def __init__(self, message: str, case: str | None = None, file: str | None = None):
        self.case = case
        self.file = file
        self.problem = message
        where = []
        if case:
            where.append(f"case {case}")
        if file:
            where.append(f"file {file}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class Cancelled(DiffKT3DError):
    """A running job was cancelled by its client (raised between sampling steps by a progress hook)."""


class ConfigError(DiffKT3DError):
    """A config, template or preset is invalid (unknown name, bad value)."""


def reject_unknown_fields(data, cls: type, what: str, error: type[DiffKT3DError] = ConfigError) -> None:
    """Raise `error` naming every key of `data` that is not a field of dataclass `cls`.

    Configs are rebuilt from checkpoints and YAML files: a misspelt key must not be ignored.
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"unknown {what} keys {unknown}; known keys: {sorted(known)}")
