"""Clinical Scorecard: institutional templates (YAML data) and the engine that scores a dose.

    from diffkt3d.scorecard import load_template, score_case
    result = score_case(dose_gy, case, load_template("openkbp_hn"))
    result.total, result.max_total, result.to_dict()   # JSON schema: docs/scorecard.md
"""

from diffkt3d.scorecard.engine import (
    RESULT_SCHEMA,
    ItemResult,
    ScorecardResult,
    SkippedItem,
    StructureSummary,
    piecewise_linear_score,
    score_case,
)
from diffkt3d.scorecard.template import (
    HardConstraint,
    ScorecardItem,
    ScorecardTemplate,
    Selector,
    list_templates,
    load_template,
    template_from_dict,
)

__all__ = [
    "RESULT_SCHEMA",
    "HardConstraint",
    "ItemResult",
    "ScorecardItem",
    "ScorecardResult",
    "ScorecardTemplate",
    "Selector",
    "SkippedItem",
    "StructureSummary",
    "list_templates",
    "load_template",
    "piecewise_linear_score",
    "score_case",
    "template_from_dict",
]
