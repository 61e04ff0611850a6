"""One line describing the machine: recorded with every benchmark and every piece of a training run.

CPU budgets are only comparable on one machine (the same kind of machine varies up to 2.5x), so
a figure or a checkpoint that does not say where it was made cannot be compared with anything.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


__all__ = ["describe_machine"]
