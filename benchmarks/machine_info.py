"""One line describing the machine a benchmark ran on, and the results writer that records it with the date."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from diffkt3d.machine import describe_machine


def write_results(out: str | Path, lines: list[str], started: dt.datetime, **payload: Any) -> None:
    """``out``.md (the report ``lines``) and ``out``.json (machine, start date and ``payload``)."""
    out = Path(out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    blob = {"machine": describe_machine(), "date": started.isoformat(), **payload}
    out.with_suffix(".json").write_text(json.dumps(blob, indent=1))


def openkbp_dir(split: str = "") -> str:
    """Where the benchmarks find OpenKBP by default: ``$DIFFKT3D_DATA_ROOT/openkbp/<split>``.

    The data are not part of the repository (README: how to get and import them); with the
    variable unset the default stays a readable ``$DIFFKT3D_DATA_ROOT/...`` path, so the "not
    found" error a benchmark gives names the variable to set.
    """
    from diffkt3d.training.recipe import DATA_ROOT_ENV

    root = os.environ.get(DATA_ROOT_ENV) or f"${DATA_ROOT_ENV}"
    return str(Path(root) / "openkbp" / split) if split else str(Path(root) / "openkbp")


def case_dirs(roots: list[str | Path], limit: int = 0) -> list[Path]:
    """The case folders under ``roots`` (the first ``limit``; 0 = all), or a one-line exit naming the
    missing folder and the variable that places the data, instead of a traceback."""
    from diffkt3d.errors import DiffKT3DError
    from diffkt3d.training.dataset import list_case_dirs
    from diffkt3d.training.recipe import DATA_ROOT_ENV

    try:
        dirs = list_case_dirs(list(roots))
    except DiffKT3DError as exc:
        raise SystemExit(f"{exc} (set ${DATA_ROOT_ENV} to the folder holding openkbp/, or pass the cases' "
                         "folder; README: how to get and import OpenKBP)") from None
    return dirs[: limit or None]

