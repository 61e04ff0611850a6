"""SceneLogic on a real MRML scene (slicer-core) with a real OpenKBP case.

Every check compares scene content with an independent computation: nibabel reads of the
files, numpy thresholds, the core library's DVH and Scorecard engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib import constants
from DiffKT3DLib.scene import SceneLogic


def test_roles_default_from_names_and_survive_as_tags(scene, loaded_case, case_structures):
    ct, seg = loaded_case
    logic = SceneLogic(scene)
    rs = {r.name: r for r in logic.segment_roles(seg)}
    assert set(rs) == set(case_structures)
    assert (rs["PTV70"].role, rs["PTV70"].prescription_gy) == ("target", 70.0)
    assert (rs["PTV56"].role, rs["PTV56"].prescription_gy) == ("target", 56.0)
    assert rs["possible_dose_mask"].role == "body" and rs["Brainstem"].role == "oar"
    rs["PTV56"].prescription_gy = 57.5
    rs["LeftParotid"].role = "ignore"
    logic.store_roles(seg, list(rs.values()))
    again = {r.name: r for r in logic.segment_roles(seg)}
    assert again["PTV56"].prescription_gy == 57.5 and again["LeftParotid"].role == "ignore"


def test_export_case_writes_the_scene_as_a_case_folder(scene, loaded_case, case_dir, tmp_path, nifti_kji):
    from diffkt3d.io.case_folder import load_case_folder

    ct, seg = loaded_case
    logic = SceneLogic(scene)
    rs = logic.segment_roles(seg)
    for r in rs:
        if r.name == "LeftParotid":
            r.role = "ignore"
    exported = logic.export_case(ct, seg, rs, tmp_path / "case")
    assert sorted(exported.files) == sorted(["ct.nii.gz", "body.nii.gz", "plan.json", "PTV70.nii.gz",
                                             "PTV56.nii.gz", "Brainstem.nii.gz", "SpinalCord.nii.gz"])
    ct_out, aff_out = nifti_kji(exported.files["ct.nii.gz"])
    ct_ref, aff_ref = nifti_kji(case_dir / "ct.nii.gz")
    np.testing.assert_array_equal(ct_out, ct_ref)
    np.testing.assert_allclose(aff_out, aff_ref, atol=1e-4)
    for name in ("PTV70", "Brainstem"):
        np.testing.assert_array_equal(nifti_kji(exported.files[f"{name}.nii.gz"])[0] > 0,
                                      nifti_kji(case_dir / f"{name}.nii.gz")[0] > 0)
    np.testing.assert_array_equal(nifti_kji(exported.files["body.nii.gz"])[0] > 0,
                                  nifti_kji(case_dir / "possible_dose_mask.nii.gz")[0] > 0)
    plan = json.loads(exported.files["plan.json"].read_text())
    assert plan["structures"]["PTV70"] == {"role": "target", "prescription_gy": 70.0}
    assert "LeftParotid" not in plan["structures"]
    case = load_case_folder(exported.folder)  # what the server does with the session folder
    assert case.max_prescription_gy() == 70.0 and case.body is not None
    assert set(case.structures) == {"PTV70", "PTV56", "Brainstem", "SpinalCord"}


def test_export_refuses_an_empty_target(slicer_core, scene, loaded_case, tmp_path):
    ct, seg = loaded_case
    logic = SceneLogic(scene)
    sid = seg.GetSegmentation().AddEmptySegment("", "PTV66")
    rs = logic.segment_roles(seg)
    assert [r for r in rs if r.segment_id == sid][0].prescription_gy == 66.0
    with pytest.raises(ValueError, match="target segment 'PTV66' is empty"):
        logic.export_case(ct, seg, rs, tmp_path / "case")


def test_load_dose_as_slicerrt_dose_volume(scene, case_dir, nifti_kji):
    logic = SceneLogic(scene)
    node = logic.load_dose(case_dir / "dose.nii.gz", "Dose c0", 70.0, "c0")
    ref, _ = nifti_kji(case_dir / "dose.nii.gz")  # uint16 x scl_slope -> Gy
    from slicer import util

    arr = util.arrayFromVolume(node)
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, ref, atol=1e-5)
    assert node.GetAttribute(constants.DOSE_VOLUME_ATTRIBUTE) == "1"
    assert node.GetAttribute(constants.CANDIDATE_ATTRIBUTE) == "c0"
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == "Dose_ColorTable"
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(77.0)  # 110 % of 70 Gy
    legends = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())
               if node.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")]
    assert len(legends) == 1 and legends[0].GetPrimaryDisplayNode() is display
    assert node.GetStorageNode() is None  # not tied to the temporary file
    # a second dose reuses the colour table
    logic.load_dose(case_dir / "dose.nii.gz", "Dose c1", 70.0, "c1")
    assert scene.GetNodesByName("Dose_ColorTable").GetNumberOfItems() == 1


def test_isodose_segments_are_dose_thresholds(scene, case_dir, nifti_kji):
    from slicer import util

    logic = SceneLogic(scene)
    dose_node = logic.load_dose(case_dir / "dose.nii.gz", "Dose", 70.0)
    iso = logic.update_isodose(dose_node, 70.0)
    segmentation = iso.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 5
    dose = nifti_kji(case_dir / "dose.nii.gz")[0]
    for i, pct in enumerate(constants.ISODOSE_LEVELS_PCT):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        assert segment.GetName() == f"{pct:g} % ({pct * 0.7:.1f} Gy)"
        assert segment.GetColor() == pytest.approx(constants.ISODOSE_COLORS[pct])
        mask = logic.segment_mask(iso, sid, dose_node)
        expected = dose >= pct / 100 * 70.0
        assert (mask > 0).sum() == expected.sum(), pct
        assert expected.sum() > 0 or pct > 100  # this plan's hot spot is 72.3 Gy (< 105 %)
        np.testing.assert_array_equal(mask > 0, expected)
    assert not iso.GetDisplayNode().GetVisibility2DFill() and iso.GetDisplayNode().GetVisibility2DOutline()
    # updating (another candidate) replaces the segments, it does not add more
    assert logic.update_isodose(dose_node, 60.0, node=iso) is iso
    assert segmentation.GetNumberOfSegments() == 5
    # the user deleted the isodose node: a new one is made instead of filling a detached node
    scene.RemoveNode(iso)
    again = logic.update_isodose(dose_node, 70.0, node=iso)
    assert again is not iso and again.GetScene() is scene
    assert util.arrayFromVolume(dose_node).max() > 0


def test_dvh_tables_and_plot_series_per_candidate(scene, loaded_case, case_dir, nifti_kji):
    from slicer import util

    from diffkt3d.metrics.dvh import cumulative_dvh

    ct, seg = loaded_case
    logic = SceneLogic(scene)
    dose0 = logic.load_dose(case_dir / "dose.nii.gz", "Dose c0", 70.0, "c0")
    dose1 = logic.load_dose(case_dir / "dose.nii.gz", "Dose c1", 70.0, "c1")
    util.updateVolumeFromArray(dose1, (util.arrayFromVolume(dose1) * 0.9).astype(np.float32))
    rs = [r for r in logic.segment_roles(seg) if r.role in ("target", "oar")]
    ids = [r.segment_id for r in rs]
    chart, table0 = logic.update_dvh("c0", 0, dose0, seg, ids)
    chart1, table1 = logic.update_dvh("c1", 1, dose1, seg, ids)
    assert chart1 is chart and chart.GetNumberOfPlotSeriesNodes() == 2 * len(ids)
    ref_dose = nifti_kji(case_dir / "dose.nii.gz")[0]
    for table, scale in ((table0, 1.0), (table1, 0.9)):
        levels = util.arrayFromTableColumn(table, "Dose [Gy]")
        for r in rs:
            mask = nifti_kji(case_dir / f"{r.name}.nii.gz")[0] > 0
            _, expected = cumulative_dvh(ref_dose * scale, mask, 0.1, max_dose_gy=float(levels[-1]))
            got = util.arrayFromTableColumn(table, f"{r.name} Volume [%]")
            np.testing.assert_allclose(got, expected[: len(got)], atol=1e-3, err_msg=r.name)
    styles = {}
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        s = chart.GetNthPlotSeriesNode(i)
        styles.setdefault(s.GetAttribute(constants.CANDIDATE_ATTRIBUTE), set()).add(s.GetLineStyleAsString(s.GetLineStyle()))
        assert s.GetXColumnName() == "Dose [Gy]"
    assert styles == {"c0": {"solid"}, "c1": {"dash"}}
    ptv = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())
           if chart.GetNthPlotSeriesNode(i).GetName() == "PTV70 (c0)"][0]
    segment = seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("PTV70"))
    assert ptv.GetColor() == pytest.approx(segment.GetColor())
    # a re-run for c0 updates its table and series instead of duplicating them
    logic.update_dvh("c0", 0, dose0, seg, ids)
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * len(ids)


def test_scorecard_table_rows_equal_the_engine_json(scene, case_dir):
    from slicer import util

    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.scorecard.engine import score_case

    case = load_case_folder(case_dir)
    result = json.loads(json.dumps(score_case(case.dose_gy, case, "openkbp_hn").to_dict()))
    logic = SceneLogic(scene)
    table = logic.scorecard_table("c0", result)
    assert table.GetName() == "Scorecard c0"
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(constants.SCORECARD_COLUMNS)
    assert table.GetNumberOfRows() == len(result["items"]) + 1
    np.testing.assert_allclose(util.arrayFromTableColumn(table, "Value")[:-1], [it["value"] for it in result["items"]])
    np.testing.assert_allclose(util.arrayFromTableColumn(table, "Score")[:-1], [it["score"] for it in result["items"]])
    np.testing.assert_allclose(util.arrayFromTableColumn(table, "Weight")[:-1], [it["weight"] for it in result["items"]])
    last = table.GetNumberOfRows() - 1
    assert table.GetCellText(last, 0) == "Total"
    assert util.arrayFromTableColumn(table, "Score")[-1] == pytest.approx(result["total"])
    for row, it in enumerate(result["items"]):
        assert table.GetCellText(row, 0) == it["structure"]
        expected = "" if it["hard"] is None else ("pass" if it["hard"]["passed"] else "FAIL")
        assert table.GetCellText(row, 7) == expected
    # comparison of two candidates
    other = json.loads(json.dumps(score_case(case.dose_gy * 0.9, case, "openkbp_hn").to_dict()))
    comp = logic.comparison_table({"c0": result, "c1": other})
    totals = [comp.GetCellText(r, 0) for r in range(comp.GetNumberOfRows())].index("Total")
    assert float(comp.GetCellText(totals, 3)) == pytest.approx(other["total"], rel=1e-3)


def test_imputed_labelmap_becomes_segments(scene, loaded_case, case_dir, tmp_path):
    import nibabel as nib

    ct, seg = loaded_case
    logic = SceneLogic(scene)
    img70 = nib.load(str(case_dir / "PTV70.nii.gz"))
    ptv70 = np.asarray(img70.dataobj) > 0
    ptv56 = np.asarray(nib.load(str(case_dir / "PTV56.nii.gz")).dataobj) > 0
    labelmap = np.zeros(ptv70.shape, np.uint8)
    labelmap[ptv56] = 2
    labelmap[ptv70] = 1
    path = tmp_path / "imputed.nii.gz"
    nib.save(nib.Nifti1Image(labelmap, img70.affine), str(path))
    added = logic.add_imputed_labelmap(seg, path, {"PTV70": 1, "PTV56": 2, "PTV63": 3}, ct)
    assert set(added) == {"PTV70", "PTV56"}  # PTV63 has no voxel
    for name, ref in (("PTV70", ptv70), ("PTV56", ptv56)):
        segment = seg.GetSegmentation().GetSegment(added[name])
        assert segment.GetName() == f"{name} (imputed)"
        mask = logic.segment_mask(seg, added[name], ct)
        np.testing.assert_array_equal(mask > 0, ref.transpose(2, 1, 0))
    roles = {r.name: r for r in logic.segment_roles(seg)}
    assert roles["PTV70 (imputed)"].role == "target" and roles["PTV70 (imputed)"].prescription_gy == 70.0


def test_imputed_ct_volume(scene, case_dir, nifti_kji):
    from slicer import util

    node = SceneLogic(scene).load_imputed_volume(case_dir / "ct.nii.gz", "imputed CT")
    np.testing.assert_array_equal(util.arrayFromVolume(node), nifti_kji(case_dir / "ct.nii.gz")[0])
    assert node.GetDisplayNode().GetWindowLevelMin() == -1000.0
