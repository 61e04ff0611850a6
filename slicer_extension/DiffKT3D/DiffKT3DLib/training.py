"""A server training run as the panel shows it: state, step progress, loss, validation figure.

MONAI Label's `GET /train/` answers the latest run with its state and the last lines of the
training process's log (`details`); the DiffKT3D trainer logs one line per logging interval
(`[stage] step 40/200 loss 0.1234 ...`) and one per validation
(`[stage] step 40 validation 1-step dose MAE in body 3.210 Gy`). The latest of each is read here.
Pure Python (no Slicer import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_STEP_RE = re.compile(r"\[([^\]]+)\] step (\d+)/(\d+) loss ([0-9.eE+-]+)")
_VAL_RE = re.compile(r"\[([^\]]+)\] step (\d+) validation (.+?) ([0-9.eE+-]+) Gy")
RUNNING_STATES = frozenset({"SUBMITTED", "RUNNING"})


@dataclass
class TrainingStatus:
    """What the panel shows of a training run (fields None when the log has no such line yet)."""

    state: str  # MONAI Label's: SUBMITTED, RUNNING, DONE, ERROR, STOPPED; "none" before any run
    task: str | None = None
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    validation: str | None = None  # e.g. "1-step dose MAE in body 3.210 Gy"
    last_line: str = ""

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def progress(self) -> float | None:
        return self.step / self.total_steps if self.step is not None and self.total_steps else None

    def summary(self) -> str:
        parts = [f"training {self.task or ''}: {self.state.lower()}".replace(" :", ":")]
        if self.step is not None:
            parts.append(f"{self.stage} step {self.step}/{self.total_steps}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.validation:
            parts.append(f"validation {self.validation}")
        return ", ".join(parts)

    @classmethod
    def from_server(cls, answer: dict[str, Any] | None) -> TrainingStatus:
        """From the `GET /train/` answer ({} or None: no run yet)."""
        if not answer:
            return cls(state="none")
        request = answer.get("request") or {}
        out = cls(state=str(answer.get("status") or "unknown"), task=request.get("model"))
        lines = [str(line) for line in answer.get("details") or []]
        out.last_line = lines[-1].strip() if lines else ""
        for line in lines:  # oldest first: the last match wins
            if m := _STEP_RE.search(line):
                out.stage, out.step, out.total_steps, out.loss = m.group(1), int(m.group(2)), int(m.group(3)), \
                    float(m.group(4))
            if m := _VAL_RE.search(line):
                out.validation = f"{m.group(3)} {float(m.group(4)):.3f} Gy"
        return out
