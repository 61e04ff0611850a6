"""Which imputation targets the server calls experimental, and the warnings an imputation came with.

The server's quality gate (docs/server.md, "Imputation quality gate") marks a target without a
passing benchmark as experimental in `/info/` and puts warnings (experimental target, empty masks)
in every imputation answer. The panel shows both, so a planner never takes an empty or untested
contour for a result. Pure Python (no Slicer imports), tested outside Slicer.
"""

from __future__ import annotations

from typing import Any

from .constants import IMPUTE_TASKS


def experimental_targets(info: dict[str, Any]) -> dict[str, str]:
    """{target: reason} for the imputation tasks `/info/` lists as not validated."""
    models = info.get("models") or {}
    out = {}
    for target, task in IMPUTE_TASKS.items():
        quality = (models.get(task) or {}).get("quality")
        if task in models and (not quality or quality.get("status") != "validated"):
            out[target] = (quality or {}).get("reason") or "the server reports no quality verdict"
    return out


def experimental_text(info: dict[str, Any]) -> str:
    """One status line, empty when every offered imputation is validated."""
    targets = experimental_targets(info)
    if not targets:
        return ""
    return f"imputation {', '.join(sorted(targets))}: experimental (no passing benchmark)"


def warnings_text(task: str, params: dict[str, Any]) -> str:
    """The status line after an imputation: done, or done with the server's warnings."""
    warnings = params.get("warnings") or []
    return f"{task}: done" + (f" -- WARNING: {'; '.join(warnings)}" if warnings else "")
