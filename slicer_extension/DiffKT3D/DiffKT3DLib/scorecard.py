"""Scorecard JSON (schema "diffkt3d.scorecard.result/1", docs/scorecard.md) -> table rows.

The server sends one Scorecard per candidate, as written by
`diffkt3d.scorecard.engine.ScorecardResult.to_dict`. This module turns it into the rows of the
Scorecard panel and the side-by-side candidate comparison. Pure Python (no Slicer import).
"""

from __future__ import annotations

from typing import Any

from .constants import SCORECARD_COLUMNS, SCORECARD_TOTAL_LABEL

Row = tuple[str, str, float, str, float, float, str, str]


def _require(result: dict[str, Any], key: str) -> Any:
    if not isinstance(result, dict) or key not in result:
        found = sorted(result) if isinstance(result, dict) else type(result).__name__
        raise ValueError(f"the server's Scorecard has no {key!r} (found {found})")
    return result[key]


def _pass_text(hard: dict[str, Any] | None) -> tuple[str, str]:
    """(bound text, "pass"/"FAIL"/"") of an item's hard constraint."""
    if not hard:
        return "", ""
    return str(hard.get("bound", "")), ("pass" if hard.get("passed") else "FAIL")


def scorecard_rows(result: dict[str, Any]) -> list[Row]:
    """One row per Scorecard item plus a last "Total" row, in `SCORECARD_COLUMNS` order.

    Item rows: structure, metric (template label if any, else the metric spec), value, unit,
    score (unweighted), weight, hard-constraint bound, pass/FAIL. The Total row holds the total
    weighted score in the Score column, the best possible total in the Value column ("of"),
    and FAIL when any hard constraint failed.

    Raises:
        ValueError: the JSON is not a Scorecard result (names the missing key).
    """
    items = _require(result, "items")
    rows: list[Row] = []
    for it in items:
        bound, passed = _pass_text(it.get("hard"))
        rows.append((str(it["structure"]), str(it.get("label") or it["metric"]), float(it["value"]),
                     str(it.get("unit", "")), float(it["score"]), float(it["weight"]), bound, passed))
    failed = (result.get("hard_constraints") or {}).get("failed") or []
    checked = (result.get("hard_constraints") or {}).get("checked", 0)
    total_pass = "FAIL" if failed else ("pass" if checked else "")
    rows.append((SCORECARD_TOTAL_LABEL, "weighted total of", float(_require(result, "max_total")), "",
                 float(_require(result, "total")), 1.0, f"{len(failed)} failed" if checked else "",
                 total_pass))
    assert all(len(r) == len(SCORECARD_COLUMNS) for r in rows)
    return rows


def comparison_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Side-by-side comparison of candidate Scorecards.

    Args:
        results: candidate id -> Scorecard JSON, in display order.

    Returns:
        (column names, rows): columns "Structure", "Metric", then one "<id> score" column per
        candidate; a row per (item, structure) found in any candidate (missing -> NaN), then
        "Total" and "Hard failures" rows.
    """
    ids = list(results)
    keys: list[tuple[str, str]] = []
    labels: dict[tuple[str, str], str] = {}
    scores: dict[str, dict[tuple[str, str], float]] = {}
    for cid, res in results.items():
        scores[cid] = {}
        for it in _require(res, "items"):
            key = (str(it["structure"]), str(it.get("id", it["metric"])))
            if key not in labels:
                keys.append(key)
                labels[key] = str(it.get("label") or it["metric"])
            scores[cid][key] = float(it["score"])
    rows: list[list[Any]] = [[s, labels[(s, i)], *[scores[c].get((s, i), float("nan")) for c in ids]]
                             for (s, i) in keys]
    rows.append([SCORECARD_TOTAL_LABEL, "weighted", *[float(_require(results[c], "total")) for c in ids]])
    rows.append(["Hard failures", "count",
                 *[float(len((results[c].get("hard_constraints") or {}).get("failed") or [])) for c in ids]])
    return ["Structure", "Metric", *[f"{c} score" for c in ids]], rows


REFERENCE_COLUMNS = ("Dose", "Gamma pass [%]", "Dose score [Gy]", "DVH score [Gy]", "Scorecard total")


def reference_rows(comparison: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The server's `comparison` (each candidate against the reference dose) as table rows.

    One row per candidate (gamma pass rate, OpenKBP dose and DVH scores, Scorecard total; NaN where
    the server gave none), then a "reference" row with the reference dose's own Scorecard total.
    """
    rows: list[list[Any]] = []
    for cid, figures in _require(comparison, "candidates").items():
        rows.append([str(cid), *[_number(figures.get(k)) for k in
                                 ("gamma_pass_rate", "dose_score", "dvh_score", "scorecard")]])
    reference = comparison.get("reference") or {}
    nan = float("nan")  # the reference is not compared with itself
    rows.append(["reference", nan, nan, nan, _number(reference.get("scorecard_total"))])
    return list(REFERENCE_COLUMNS), rows


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
