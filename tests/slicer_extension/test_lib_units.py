"""Pure-Python parts of DiffKT3DLib, checked against the core library (independent code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from DiffKT3DLib import candidates, constants, dvh, preview, roles, scorecard
from DiffKT3DLib.client import normalize_server_url

NAMES = ["PTV70", "PTV_7000", "ptv-56", "CTV 63 Gy", "GTV", "ITV", "PTV", "Body", "EXTERNAL", "skin",
         "possible_dose_mask", "Brainstem", "SpinalCord", "Left Parotid", "PTV63.5", "ptv70,2", "Outline"]


@pytest.mark.parametrize("name", NAMES)
def test_infer_role_copy_equals_core(name):
    from diffkt3d.data.case import infer_role

    assert roles.infer_role(name) == infer_role(name)


def test_lib_constants_equal_core_constants():
    import diffkt3d.constants as core
    from diffkt3d.data.case import ROLES

    assert constants.CT_FILE == core.CT_FILE
    assert constants.DOSE_FILE == core.DOSE_FILE
    assert constants.PLAN_FILE == core.PLAN_FILE
    assert constants.BODY_FILE in core.BODY_FILES
    assert constants.DOSE_SCALE_GY == core.DOSE_SCALE_GY
    assert constants.ROLES == ROLES
    assert set(constants.IMPUTE_TASKS) == set(core.IMPUTABLE)
    assert constants.DEFAULT_STEPS == core.DEFAULT_STEPS
    assert constants.DEFAULT_TEMPLATE == core.DEFAULT_TEMPLATE
    assert constants.PREVIEW_STEPS == core.PREVIEW_STEPS


def test_panel_steps_box_starts_at_the_default_steps():
    """The .ui file's initial value is what Slicer shows before the panel sets it: keep them equal."""
    from pathlib import Path

    ui = (Path(constants.__file__).parents[1] / "Resources" / "UI" / "DiffKT3D.ui").read_text()
    line = next(x for x in ui.splitlines() if 'name="stepsSpinBox"' in x)
    assert f'<property name="value"><number>{constants.DEFAULT_STEPS}</number></property>' in line


def test_default_roles_from_names():
    assert roles.default_role("s1", "PTV70") == roles.StructureRole("s1", "PTV70", "target", 70.0)
    assert roles.default_role("s2", "External").role == "body"
    r = roles.default_role("s3", "Brainstem")
    assert (r.role, r.prescription_gy) == ("oar", None)


def test_file_stems_are_safe_and_unique():
    taken: set[str] = set()
    assert roles.file_stem("PTV70", taken) == "PTV70"
    assert roles.file_stem("Left Parotid", taken) == "Left_Parotid"
    assert roles.file_stem("Left/Parotid", taken) == "Left_Parotid_2"
    assert roles.file_stem("../ct", taken) == "ct_seg"  # never a path, never a reserved file
    assert roles.file_stem("", taken) == "structure"


def test_request_plan_is_read_back_by_the_core_reader(tmp_path):
    """plan.json written by the Lib + masks -> the core's case-folder reader gets the same roles."""
    import nibabel as nib

    from diffkt3d.io.case_folder import load_case_folder

    shape, affine = (6, 7, 8), np.diag([2.0, 2.0, 3.0, 1.0])
    ct = np.zeros(shape, np.int16)
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "ct.nii.gz")
    rs = [roles.StructureRole("a", "Boost PTV", "target", 66.0), roles.StructureRole("b", "Cord", "oar"),
          roles.StructureRole("c", "junk", "ignore")]
    stems = {"a": "Boost_PTV", "b": "Cord"}
    for stem in stems.values():
        m = np.zeros(shape, np.uint8)
        m[2:4, 2:4, 2:4] = 1
        nib.save(nib.Nifti1Image(m, affine), tmp_path / f"{stem}.nii.gz")
    (tmp_path / "plan.json").write_text(json.dumps(roles.request_plan(rs, stems)))
    case = load_case_folder(tmp_path)
    assert case.structures["Boost_PTV"].role == "target"
    assert case.structures["Boost_PTV"].prescription_gy == 66.0
    assert case.structures["Cord"].role == "oar"
    assert "junk" not in case.structures


def test_bad_role_and_prescription_are_named():
    with pytest.raises(ValueError, match="Cord.*unknown role"):
        roles.StructureRole("x", "Cord", "organ").validate()
    with pytest.raises(ValueError, match="PTV.*outside"):
        roles.StructureRole("x", "PTV", "target", -5.0).validate()


def test_dvh_equals_core_cumulative_dvh():
    from diffkt3d.metrics.dvh import cumulative_dvh

    rng = np.random.default_rng(0)
    dose = rng.gamma(4.0, 8.0, size=(12, 13, 14)).astype(np.float32)
    mask = rng.random(dose.shape) > 0.6
    levels = dvh.dose_levels(float(dose.max()), 0.1)
    core_levels, core_pct = cumulative_dvh(dose, mask, 0.1, max_dose_gy=float(levels[-1]))
    np.testing.assert_allclose(levels, core_levels[: len(levels)], atol=1e-9)
    np.testing.assert_allclose(dvh.cumulative_dvh(dose, mask, levels), core_pct[: len(levels)], atol=1e-9)
    vol = dvh.cumulative_dvh(dose, mask, levels)
    assert vol[0] == 100.0 and vol[-1] == 0.0  # starts at 100 %, ends at 0 % (one bin past the max)
    with pytest.raises(ValueError, match="empty"):
        dvh.cumulative_dvh(dose, np.zeros_like(mask), levels)


def test_debouncer_fires_once_after_quiet_period():
    now = [0.0]
    fired: list[set[str]] = []
    deb = preview.Debouncer(fired.append, delay_s=1.0, clock=lambda: now[0])
    deb.trigger("s1")
    now[0] = 0.5
    deb.trigger("s2")  # restarts the quiet period
    now[0] = 1.4
    assert not deb.poll() and fired == []
    now[0] = 1.5
    assert deb.poll() and fired == [{"s1", "s2"}]
    now[0] = 10.0
    assert not deb.poll() and len(fired) == 1  # nothing pending
    deb.enabled = False
    deb.trigger("s3")
    now[0] = 20.0
    assert not deb.poll() and len(fired) == 1  # disabled: edits ignored


@pytest.mark.parametrize(("given", "expected"), [
    ("", "http://127.0.0.1:8000"),
    (None, "http://127.0.0.1:8000"),
    ("localhost:8000", "http://localhost:8000"),
    ("10.0.0.5:8123/", "http://10.0.0.5:8123"),
    ("https://gpu-node.example.org/", "https://gpu-node.example.org"),
    ("  http://127.0.0.1:9000//  ", "http://127.0.0.1:9000"),
])
def test_normalize_server_url(given, expected):
    assert normalize_server_url(given) == expected


@pytest.mark.parametrize("bad", ["ftp://host:21", "http://", "host name with spaces", "http://host:99999"])
def test_normalize_server_url_rejects(bad):
    with pytest.raises(ValueError, match="server URL"):
        normalize_server_url(bad)


def _scorecard(case, dose):
    from diffkt3d.scorecard.engine import score_case

    return score_case(dose, case, "openkbp_hn").to_dict()


@pytest.fixture(scope="module")
def small_case():
    """A synthetic case with a PTV70, a PTV56 and two OARs (core Case model)."""
    from diffkt3d.data.case import Case, Grid, Structure

    shape = (20, 20, 20)
    grid = Grid(shape, np.diag([3.0, 3.0, 3.0, 1.0]))
    z = np.zeros(shape, bool)
    ptv70, ptv56, cord, stem = z.copy(), z.copy(), z.copy(), z.copy()
    ptv70[8:12, 8:12, 8:12] = True
    ptv56[4:7, 4:8, 4:8] = True
    cord[14:17, 8:12, 2:18] = True
    stem[2:4, 14:18, 8:12] = True
    s = {"PTV70": Structure("PTV70", ptv70, "target", 70.0), "PTV56": Structure("PTV56", ptv56, "target", 56.0),
         "SpinalCord": Structure("SpinalCord", cord, "oar"), "Brainstem": Structure("Brainstem", stem, "oar")}
    return Case("synthetic", grid, ct_hu=np.zeros(shape, np.float32), structures=s)


def test_scorecard_rows_equal_the_json(small_case):
    rng = np.random.default_rng(1)
    dose = (small_case.prescription_map_gy() + rng.normal(0, 2, small_case.grid.shape)).clip(0).astype(np.float32)
    result = json.loads(json.dumps(_scorecard(small_case, dose)))  # as received over HTTP
    rows = scorecard.scorecard_rows(result)
    assert len(rows) == len(result["items"]) + 1
    for row, item in zip(rows[:-1], result["items"], strict=True):
        assert row[0] == item["structure"]
        assert row[2] == pytest.approx(item["value"])
        assert row[4] == pytest.approx(item["score"])
        assert row[5] == pytest.approx(item["weight"])
        if item["hard"] is None:
            assert row[6:] == ("", "")
        else:
            assert row[7] == ("pass" if item["hard"]["passed"] else "FAIL")
    total = rows[-1]
    assert total[0] == "Total" and total[4] == pytest.approx(result["total"])
    assert total[2] == pytest.approx(result["max_total"])
    assert total[7] == ("FAIL" if result["hard_constraints"]["failed"] else "pass")
    with pytest.raises(ValueError, match="no 'items'"):
        scorecard.scorecard_rows({"total": 1})


def _dose_answer(small_case, n: int, preview: bool = False) -> dict:
    """A `dose` answer as the server builds it: the core's DosePrediction.to_dict() plus transport fields."""
    from diffkt3d.inference import Candidate, CaseInfo, DosePrediction
    from diffkt3d.metrics.dvh_table import dvh_table
    from diffkt3d.scorecard.engine import score_case

    rng = np.random.default_rng(2)
    cands = []
    for k in range(n):
        dose = (small_case.prescription_map_gy() * (0.95 + 0.03 * k)
                + rng.normal(0, 1, small_case.grid.shape)).clip(0).astype(np.float32)
        cands.append(Candidate(id=f"c{k}", seed=7 + k, dose_gy=dose,
                               scorecard=score_case(dose, small_case, "openkbp_hn")))
    best = max(cands, key=lambda c: c.total_score)
    pred = DosePrediction(candidates=cands, chosen_id=best.id, steps=1 if preview else 10, seed=7,
                          model_version="any2any-tiny-x", aggregate="best", template="openkbp_hn", preview=preview,
                          case=CaseInfo.of(small_case), dvh=dvh_table(best.dose_gy, small_case))
    return json.loads(json.dumps({"task": "dose", "request_id": "r1", **pred.to_dict()}))  # as received over HTTP


def test_candidates_and_preference_record_pass_the_core_validator(small_case):
    from diffkt3d.preferences.record import PreferenceRecord

    cset = candidates.CandidateSet.from_response(_dose_answer(small_case, 3))
    assert [c.id for c in cset.candidates] == ["c0", "c1", "c2"]
    assert cset.active_id == cset.best_id
    cset.set_active("c0")
    assert cset.active.id == "c0"
    record = cset.preference_record("c2", "dr_smith", "  better cord sparing ")
    parsed = PreferenceRecord.from_dict(json.loads(json.dumps(record)), new=True)  # the store's validator
    assert parsed.chosen_id == "c2" and parsed.rater == "dr_smith" and parsed.comment == "better cord sparing"
    assert [c.seed for c in parsed.candidates] == [7, 8, 9]
    core_items = {f"{it['id']}/{it['structure']}": it["score"] for it in cset.get("c1").scorecard["items"]}
    assert parsed.candidates[1].scorecard_items == pytest.approx(core_items)
    with pytest.raises(ValueError, match="no candidate 'c9'"):
        cset.preference_record("c9", "dr_smith")
    with pytest.raises(ValueError, match="rater"):
        cset.preference_record("c1", "  ")


def test_answer_without_candidate_scores_is_named(small_case):
    answer = _dose_answer(small_case, 2)
    del answer["candidates"][1]["scorecard_items"]
    with pytest.raises(ValueError, match=r"candidate c1 of the dose answer has no 'scorecard_items'"):
        candidates.CandidateSet.from_response(answer)
    with pytest.raises(ValueError, match="no 'candidates'"):
        candidates.CandidateSet.from_response({"task": "dose"})


def test_preview_and_single_candidates_cannot_be_rated(small_case):
    with pytest.raises(ValueError, match="preview"):
        candidates.CandidateSet.from_response(_dose_answer(small_case, 2, preview=True)).preference_record(
            "c0", "dr")
    with pytest.raises(ValueError, match="at least 2 candidates"):
        candidates.CandidateSet.from_response(_dose_answer(small_case, 1)).preference_record("c0", "dr")


def test_comparison_rows(small_case):
    answer = _dose_answer(small_case, 2)
    cols, rows = scorecard.comparison_rows({c["id"]: c["scorecard"] for c in answer["candidates"]})
    assert cols == ["Structure", "Metric", "c0 score", "c1 score"]
    total_row = [r for r in rows if r[0] == "Total"][0]
    assert total_row[2:] == pytest.approx([c["scorecard"]["total"] for c in answer["candidates"]])
    first = answer["candidates"][1]["scorecard"]["items"][0]
    row = [r for r in rows if r[0] == first["structure"] and r[1] == (first["label"] or first["metric"])][0]
    assert row[3] == pytest.approx(first["score"])


def test_served_model_line_names_the_version_its_parent_and_its_figures():
    from DiffKT3DLib.served_model import served_model_text

    served = {"id": "v2-scardnft", "parent": "shipped", "validation": {
        "cases": ["pt_1", "pt_2"], "candidate_means": {"dose_score_gy": 3.104, "dvh_score_gy": 2.0,
                                                       "scorecard_pct": 71.25, "preference_scorecard_pct": None}}}
    assert served_model_text({"diffkt3d": {"served_model": served}}) == (
        "model v2-scardnft (from shipped), validated on 2 cases: dose score 3.10 Gy, DVH score 2.00 Gy, "
        "Scorecard 71.2 %")
    assert served_model_text({"diffkt3d": {"served_model": {"id": "shipped", "validation": None}}}) == (
        "model shipped (the shipped model)")
    assert "--conf model" in served_model_text({"diffkt3d": {"served_model": {"pinned_by_conf_model": True}}})
    assert "does not report" in served_model_text({"diffkt3d": {}})


def test_imputation_quality_lines_follow_the_servers_verdicts():
    from DiffKT3DLib.imputation_quality import experimental_targets, experimental_text, warnings_text

    info = {"models": {"dose": {}, "impute_ct": {"quality": {"status": "validated", "reason": "MAE 120 HU"}},
                       "impute_oar": {"quality": {"status": "experimental", "reason": "mean Dice 0.02"}},
                       "impute_ptv": {}}}
    assert experimental_targets(info) == {"oar": "mean Dice 0.02", "ptv": "the server reports no quality verdict"}
    assert experimental_text(info) == "imputation oar, ptv: experimental (no passing benchmark)"
    info["models"]["impute_oar"]["quality"]["status"] = "validated"
    del info["models"]["impute_ptv"]  # a task the server does not offer is not flagged
    assert experimental_text(info) == ""
    assert warnings_text("impute_oar", {"warnings": []}) == "impute_oar: done"
    assert warnings_text("impute_oar", {"warnings": ["a", "Larynx: the imputed mask is empty"]}) == \
        "impute_oar: done -- WARNING: a; Larynx: the imputed mask is empty"
