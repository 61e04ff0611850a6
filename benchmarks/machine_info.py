"""One line describing the machine a benchmark ran on, and the results writer that records it with the date."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe_machine() -> str:
    """CPU model, core count, torch version and its thread count."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_results(out: str | Path, lines: list[str], started: dt.datetime, **payload: Any) -> None:
    """``out``.md (the report ``lines``) and ``out``.json (machine, start date and ``payload``)."""
    out = Path(out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    blob = {"machine": describe_machine(), "date": started.isoformat(), **payload}
    out.with_suffix(".json").write_text(json.dumps(blob, indent=1))
