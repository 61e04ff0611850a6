"""The panel's line about the served model: which version the server serves and what it was accepted on.

Read from `/info/` (`diffkt3d.served_model`, docs/server.md "Model versions"), so a physicist sees in
Slicer whether doses come from the shipped model or from a version trained on the clinic's cases.
Pure Python (no Slicer imports), tested outside Slicer.
"""

from __future__ import annotations

from typing import Any

# Mean figure of the validation the served version passed -> how the panel shows it.
FIGURES = (("dose_score_gy", "dose score {:.2f} Gy"), ("dvh_score_gy", "DVH score {:.2f} Gy"),
           ("scorecard_pct", "Scorecard {:.1f} %"), ("preference_scorecard_pct", "preference-weighted {:.1f} %"))


def served_model_text(info: dict[str, Any]) -> str:
    """E.g. "model v2-scardnft (from shipped), validated on 2 cases: dose score 3.10 Gy, ..."."""
    served = (info.get("diffkt3d") or {}).get("served_model")
    if not served:
        return "model: the server does not report model versions"
    if served.get("pinned_by_conf_model"):
        return "model: fixed by the server's --conf model (no model versions)"
    version = served.get("id") or "?"
    text = f"model {version}" + (f" (from {served['parent']})" if served.get("parent") else "")
    validation = served.get("validation") or {}
    means = validation.get("candidate_means") or {}
    figures = [fmt.format(means[key]) for key, fmt in FIGURES if isinstance(means.get(key), (int, float))]
    if figures:
        return text + f", validated on {len(validation.get('cases') or [])} cases: " + ", ".join(figures)
    return text + (" (the shipped model)" if version == "shipped" else ", no validation figures")
