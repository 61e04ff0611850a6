"""Scorecard engine: scores checked against hand-computed values and independent numpy DVH maths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.errors import CaseError, ConfigError
from diffkt3d.scorecard import (
    HardConstraint,
    Selector,
    piecewise_linear_score,
    score_case,
    template_from_dict,
)

SHAPE = (12, 10, 10)
SPACING_MM = (2.0, 2.0, 2.5)  # voxel = 10 mm^3 = 0.01 cc


def _grid() -> Grid:
    return Grid(shape=SHAPE, affine=np.diag([*SPACING_MM, 1.0]))


def _box(i0: int, i1: int) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[i0:i1, 2:8, 2:8] = True
    return m


def _case(rx_names: tuple[tuple[str, float], ...] = (("PTV70", 70.0), ("PTV56", 56.0)),
          oars: tuple[str, ...] = ("SpinalCord", "LeftParotid", "RightParotid")) -> Case:
    """Structures are disjoint 2-slice slabs (72 voxels each) so doses can be set per structure."""
    structures: dict[str, Structure] = {}
    slab = 0
    for name, rx in rx_names:
        structures[name] = Structure(name, _box(slab, slab + 2), "target", rx)
        slab += 2
    for name in oars:
        structures[name] = Structure(name, _box(slab, slab + 2), "oar", None)
        slab += 2
    return Case(case_id="synthetic", grid=_grid(), structures=structures)


def _dose_with(case: Case, per_structure: dict[str, np.ndarray | float]) -> np.ndarray:
    dose = np.zeros(SHAPE, dtype=np.float32)
    for name, values in per_structure.items():
        m = case.structures[name].mask
        dose[m] = values if np.isscalar(values) else np.asarray(values, dtype=np.float32)
    return dose


def _template(items: list[dict], name: str = "t") -> object:
    return template_from_dict({"name": name, "items": items}, source=f"{name}.yaml")


# -- piecewise-linear scoring and hinge penalties ---------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (85.0, 0.0),      # clamped below the first point
    (90.0, 0.0),
    (92.5, 3.0),      # halfway 0 -> 6
    (95.0, 6.0),
    (97.5, 8.0),      # halfway 6 -> 10
    (100.0, 10.0),
    (120.0, 10.0),    # clamped above the last point
])
def test_piecewise_linear_increasing(value: float, expected: float) -> None:
    assert piecewise_linear_score(value, [(90, 0), (95, 6), (100, 10)]) == pytest.approx(expected)


@pytest.mark.parametrize(("value", "expected"), [
    (10.0, 10.0), (40.0, 10.0), (42.0, 8.4), (45.0, 6.0), (47.5, 3.0), (50.0, 0.0), (80.0, 0.0)])
def test_piecewise_linear_decreasing(value: float, expected: float) -> None:
    # "lower dose is better": 40 Gy -> 10, 45 Gy -> 6, 50 Gy -> 0
    assert piecewise_linear_score(value, [(40, 10), (45, 6), (50, 0)]) == pytest.approx(expected)


def test_hinge_penalty() -> None:
    upper = HardConstraint(max=45.0, penalty_per_unit=2.0)
    assert upper.evaluate(44.0) == (True, 0.0)
    assert upper.evaluate(45.0) == (True, 0.0)
    passed, penalty = upper.evaluate(47.5)
    assert not passed and penalty == pytest.approx(5.0)  # 2 x (47.5 - 45)
    lower = HardConstraint(min=95.0, penalty_per_unit=0.5)
    passed, penalty = lower.evaluate(91.0)
    assert not passed and penalty == pytest.approx(2.0)  # 0.5 x (95 - 91)
    both = HardConstraint(min=10.0, max=20.0)
    assert both.evaluate(15.0) == (True, 0.0)
    assert both.evaluate(25.0) == (False, 5.0)


# -- score_case on synthetic cases ------------------------------------------------------------------
def test_score_case_matches_independent_dvh_and_hand_scores() -> None:
    case = _case()
    rng = np.random.default_rng(1)
    ptv_doses = rng.uniform(60.0, 75.0, size=72)
    cord_doses = rng.uniform(5.0, 50.0, size=72)
    dose = _dose_with(case, {"PTV70": ptv_doses, "PTV56": 56.0, "SpinalCord": cord_doses,
                             "LeftParotid": 23.0, "RightParotid": 30.0})
    tpl = _template([
        {"id": "d95", "structure": "target:highest", "metric": "D95%_%Rx",
         "points": [[90, 0], [95, 6], [100, 10]], "weight": 3, "hard": {"min": 95, "penalty": 1.0}},
        {"id": "cord", "structure": "SpinalCord", "metric": "D0.1cc",
         "points": [[40, 10], [45, 6], [50, 0]], "weight": 2, "hard": {"max": 45, "penalty": 2.0}},
        {"id": "parotid", "structure": "glob:*parotid", "metric": "Dmean",
         "points": [[10, 10], [20, 8], [26, 6], [39, 0]], "weight": 1.5},
    ])
    result = score_case(dose, case, tpl)

    # independent DVH maths with numpy on the generated voxel doses (float32 as stored)
    ptv = np.sort(ptv_doses.astype(np.float32).astype(np.float64))
    d95_pct = 100.0 * np.percentile(ptv, 5) / 70.0
    cord = np.sort(cord_doses.astype(np.float32).astype(np.float64))
    d01cc = cord[-10]  # 0.1 cc / 0.01 cc per voxel = 10 hottest voxels; their minimum
    rows = {(r.item_id, r.structure): r for r in result.items}
    assert set(rows) == {("d95", "PTV70"), ("cord", "SpinalCord"), ("parotid", "LeftParotid"),
                         ("parotid", "RightParotid")}
    r = rows[("d95", "PTV70")]
    assert r.value == pytest.approx(d95_pct, rel=1e-9)
    assert r.unit == "%Rx" and r.prescription_gy == 70.0
    assert r.score == pytest.approx(np.interp(d95_pct, [90, 95, 100], [0, 6, 10]))
    assert r.weighted_score == pytest.approx(3 * r.score)
    assert r.hard_passed == (d95_pct >= 95)
    assert r.penalty == pytest.approx(max(0.0, 95 - d95_pct))
    c = rows[("cord", "SpinalCord")]
    assert c.value == pytest.approx(d01cc) and c.unit == "Gy"
    assert c.score == pytest.approx(np.interp(d01cc, [40, 45, 50], [10, 6, 0]))
    assert c.penalty == pytest.approx(2.0 * max(0.0, d01cc - 45))
    # parotids: uniform doses -> hand values. 23 Gy: 8 - 2 * 3/6 = 7; 30 Gy: 6 - 6 * 4/13
    assert rows[("parotid", "LeftParotid")].score == pytest.approx(7.0)
    assert rows[("parotid", "RightParotid")].score == pytest.approx(6.0 - 6.0 * 4.0 / 13.0)
    assert rows[("parotid", "RightParotid")].weighted_score == pytest.approx(1.5 * (6.0 - 24.0 / 13.0))

    expected_total = sum(x.weighted_score for x in rows.values())
    assert result.total == pytest.approx(expected_total)
    assert result.max_total == pytest.approx(3 * 10 + 2 * 10 + 2 * 1.5 * 10)
    assert result.penalty_total == pytest.approx(r.penalty + c.penalty)
    per = result.per_structure
    assert per["LeftParotid"].weighted_score == pytest.approx(1.5 * 7.0)
    assert sum(s.weighted_score for s in per.values()) == pytest.approx(result.total)
    assert result.skipped == []


def test_prescription_relative_points_serve_70_and_60_gy_plans() -> None:
    tpl = _template([{"id": "d95", "structure": "target:highest", "metric": "D95%_%Rx",
                      "points": [[90, 0], [95, 6], [100, 10]]}])
    scores = []
    for name, rx in (("PTV70", 70.0), ("PTV_60Gy", 60.0)):
        case = _case(rx_names=((name, rx),), oars=())
        dose = _dose_with(case, {name: 0.975 * rx})
        scores.append(score_case(dose, case, tpl).items[0].score)
    assert scores == pytest.approx([8.0, 8.0])  # 97.5 % Rx -> 8 for both prescriptions


def test_rx_rules_for_oar_items() -> None:
    case = _case()
    dose = _dose_with(case, {"PTV70": 70.0, "PTV56": 56.0, "LeftParotid": 35.0, "SpinalCord": 1.0,
                             "RightParotid": 1.0})
    base = {"structure": "LeftParotid", "metric": "Dmean_%Rx", "points": [[0, 10], [100, 0]]}
    tpl = _template([{**base, "id": "case_max"}, {**base, "id": "fixed", "rx": 50}])
    rows = {r.item_id: r for r in score_case(dose, case, tpl).items}
    assert rows["case_max"].value == pytest.approx(50.0)  # 35 / 70 (highest Rx of the case)
    assert rows["case_max"].score == pytest.approx(5.0)
    assert rows["fixed"].value == pytest.approx(70.0)  # 35 / 50
    assert rows["fixed"].score == pytest.approx(3.0)


# -- selectors --------------------------------------------------------------------------------------
def test_role_selectors_follow_prescriptions_not_names() -> None:
    case = _case(rx_names=(("PTV_High", 66.0), ("CTV_5400", 54.0), ("PTV60", 60.0)), oars=("Cord",))
    names = lambda sel: [s.name for s in Selector.parse(sel).select(case)]  # noqa: E731
    assert names("target:highest") == ["PTV_High"]
    assert sorted(names("target:lower")) == ["CTV_5400", "PTV60"]
    assert names("target:lowest") == ["CTV_5400"]
    assert sorted(names("target:any")) == ["CTV_5400", "PTV60", "PTV_High"]
    assert names("oar:any") == ["Cord"]
    single = _case(rx_names=(("PTV70", 70.0),), oars=())
    # one target only: it is the highest, and there is no distinct "lowest" to score twice
    assert [s.name for s in Selector.parse("target:lowest").select(single)] == []
    assert [s.name for s in Selector.parse("target:lower").select(single)] == []


def test_name_regex_glob_selectors_are_case_insensitive() -> None:
    case = _case(oars=("SpinalCord", "Parotid_L", "parotid_r", "Brain_Stem"))
    sel = lambda s: sorted(x.name for x in Selector.parse(s).select(case))  # noqa: E731
    assert sel("spinalcord") == ["SpinalCord"]
    assert sel("name:SPINALCORD") == ["SpinalCord"]
    assert sel("re:parotid_(l|r)") == ["Parotid_L", "parotid_r"]
    assert sel("re:parotid") == []  # regex must match the whole name
    assert sel("glob:PAROTID*") == ["Parotid_L", "parotid_r"]
    assert sel("re:brain[ _-]?stem") == ["Brain_Stem"]


@pytest.mark.parametrize("bad", ["", "re:(unclosed", "target:middle", "organ:any", "oar:highest"])
def test_bad_selectors_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        Selector.parse(bad)


# -- skipped / unknown structures -------------------------------------------------------------------
def test_absent_structures_are_skipped_and_listed() -> None:
    case = _case(oars=("SpinalCord",))
    dose = _dose_with(case, {"PTV70": 70.0, "PTV56": 56.0, "SpinalCord": 30.0})
    tpl = _template([
        {"id": "cord", "structure": "SpinalCord", "metric": "Dmax", "points": [[45, 10], [50, 0]]},
        {"id": "larynx", "structure": "Larynx", "metric": "Dmean", "points": [[44, 10], [55, 0]],
         "weight": 4},
    ])
    result = score_case(dose, case, tpl)
    assert [r.item_id for r in result.items] == ["cord"]
    assert [(s.item_id, s.selector) for s in result.skipped] == [("larynx", "Larynx")]
    assert "no matching structure" in result.skipped[0].reason
    assert result.max_total == pytest.approx(10.0)  # the skipped item adds nothing to the maximum
    assert result.to_dict()["skipped"][0]["id"] == "larynx"
    assert "larynx" in result.table() and "skipped" in result.table()


def test_required_item_missing_is_unknown_structure_error() -> None:
    case = _case(oars=("SpinalCord",))
    dose = _dose_with(case, {"SpinalCord": 30.0})
    tpl = _template([{"id": "larynx", "structure": "Larynx", "metric": "Dmean",
                      "points": [[44, 10], [55, 0]], "required": True}])
    with pytest.raises(CaseError, match="unknown Scorecard structure 'Larynx'") as exc:
        score_case(dose, case, tpl)
    assert exc.value.case == "synthetic"
    assert "synthetic" in str(exc.value) and "SpinalCord" in str(exc.value)


def test_requested_structure_missing_is_unknown_structure_error() -> None:
    case = _case()
    dose = _dose_with(case, {"PTV70": 70.0})
    tpl = _template([{"id": "cord", "structure": "SpinalCord", "metric": "Dmax",
                      "points": [[45, 10], [50, 0]]}])
    with pytest.raises(CaseError, match="unknown Scorecard structure 'Brainstem'") as exc:
        score_case(dose, case, tpl, structures=["Brainstem"])
    assert exc.value.case == "synthetic"
    # an existing requested structure restricts scoring to it
    only = score_case(dose, case, tpl, structures=["spinalcord"])
    assert [r.structure for r in only.items] == ["SpinalCord"]
    none = score_case(dose, case, tpl, structures=["LeftParotid"])
    assert none.items == [] and none.skipped[0].reason == "structure not requested"


def test_bad_dose_is_case_error() -> None:
    case = _case()
    tpl = _template([{"structure": "SpinalCord", "metric": "Dmax", "points": [[45, 10], [50, 0]]}])
    with pytest.raises(CaseError, match="expected the case grid"):
        score_case(np.zeros((4, 4, 4), dtype=np.float32), case, tpl)
    dose = np.zeros(SHAPE, dtype=np.float32)
    dose[0, 0, 0] = np.nan
    with pytest.raises(CaseError, match="NaN"):
        score_case(dose, case, tpl)


def test_weight_overrides() -> None:
    case = _case()
    dose = _dose_with(case, {"SpinalCord": 47.5})
    tpl = _template([{"id": "cord", "structure": "SpinalCord", "metric": "Dmax",
                      "points": [[45, 10], [50, 0]], "weight": 1}])
    r = score_case(dose, case, tpl, weights={"cord": 4.0})
    assert r.items[0].weighted_score == pytest.approx(4 * 5.0)
    assert r.max_total == pytest.approx(40.0)
    with pytest.raises(ConfigError, match="unknown item"):
        score_case(dose, case, tpl, weights={"nope": 1.0})
    with pytest.raises(ConfigError, match="weight must be > 0"):
        score_case(dose, case, tpl, weights={"cord": 0.0})


def test_json_form_holds_the_same_figures() -> None:
    case = _case()
    dose = _dose_with(case, {"PTV70": 68.0, "PTV56": 55.0, "SpinalCord": 46.0,
                             "LeftParotid": 20.0, "RightParotid": 40.0})
    tpl = _template([
        {"id": "d95", "structure": "target:any", "metric": "D95%_%Rx",
         "points": [[90, 0], [100, 10]], "hard": {"min": 95}},
        {"id": "cord", "structure": "SpinalCord", "metric": "D0.1cc",
         "points": [[40, 10], [50, 0]], "hard": {"max": 45}},
    ])
    result = score_case(dose, case, tpl)
    data = json.loads(result.to_json())
    assert data["schema"] == "diffkt3d.scorecard.result/1"
    assert data["total"] == pytest.approx(sum(i["weighted_score"] for i in data["items"]))
    assert data["max_total"] == pytest.approx(30.0)
    assert data["penalty_total"] == pytest.approx(1.0)  # cord 46 Gy > 45 Gy, penalty 1/Gy
    assert data["hard_constraints"] == {"checked": 3, "failed": ["cord/SpinalCord"]}
    assert data["structures"]["SpinalCord"]["score"] == pytest.approx(4.0)
    item = next(i for i in data["items"] if i["structure"] == "PTV56")
    assert item["value"] == pytest.approx(100 * 55 / 56, rel=1e-6)
    assert item["hard"] == {"bound": ">= 95", "passed": True, "penalty": 0.0}
