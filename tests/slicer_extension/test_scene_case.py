"""A case folder with imputed structures (`diffkt3d impute --write-case`) loaded into a real MRML
scene (slicer-core): segments keep the structure names, carry the roles and prescriptions of
plan.json, and the imputed ones say so (tags Imputed / ImputedBy), with masks equal to the files."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
import vtk
from DiffKT3DLib.constants import (
    IMPUTED_ATTRIBUTE,
    IMPUTED_BY_ATTRIBUTE,
    PRESCRIPTION_ATTRIBUTE,
    ROLE_ATTRIBUTE,
)
from DiffKT3DLib.scene import SceneLogic
from DiffKT3DLib.scene_case import load_case_folder

LOADED = ("PTV70", "PTV56", "Brainstem", "SpinalCord", "possible_dose_mask")


def _tag(segment, name: str) -> str | None:
    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


@pytest.fixture
def imputed_case(case_dir, tmp_path):
    """pt_201 with an imputed Brainstem (the clinician's, shifted 2 voxels), an empty imputed SpinalCord
    (the clinician's is kept) and an imputed PTV56 (the union of PTV56 and PTV70), written by the
    function behind `diffkt3d impute --write-case` (the model itself is tested in tests/cli)."""
    from diffkt3d.io.case_folder import load_case_folder as load_case
    from diffkt3d.io.imputed_case import write_imputed_case

    case = load_case(case_dir)
    brainstem = np.roll(case.structures["Brainstem"].mask, 2, axis=0)
    out = tmp_path / "imputed" / case.case_id
    write_imputed_case(case_dir, case, {"Brainstem": brainstem, "SpinalCord": np.zeros(case.grid.shape, bool)},
                       "oar", "m@7", out)
    ptv56 = case.structures["PTV56"].mask | case.structures["PTV70"].mask
    final = tmp_path / "imputed-ptv" / case.case_id
    write_imputed_case(out, load_case(out), {"PTV56": ptv56}, "ptv", "m@8", final)
    return final


def test_imputed_case_folder_loads_with_names_roles_and_imputed_tags(scene, imputed_case, nifti_kji):
    loaded = load_case_folder(scene, imputed_case, LOADED, as_case=True)
    seg = loaded.segmentation_node.GetSegmentation()
    segments = {seg.GetSegment(seg.GetNthSegmentID(i)).GetName(): seg.GetNthSegmentID(i)
                for i in range(seg.GetNumberOfSegments())}
    assert set(segments) == set(LOADED)
    tags = {name: {t: _tag(seg.GetSegment(sid), t) for t in (ROLE_ATTRIBUTE, PRESCRIPTION_ATTRIBUTE,
                                                             IMPUTED_ATTRIBUTE, IMPUTED_BY_ATTRIBUTE)}
            for name, sid in segments.items()}
    assert tags["Brainstem"] == {ROLE_ATTRIBUTE: "oar", PRESCRIPTION_ATTRIBUTE: "", IMPUTED_ATTRIBUTE: "1",
                                 IMPUTED_BY_ATTRIBUTE: "m@7"}
    assert tags["PTV56"] == {ROLE_ATTRIBUTE: "target", PRESCRIPTION_ATTRIBUTE: "56.0", IMPUTED_ATTRIBUTE: "1",
                             IMPUTED_BY_ATTRIBUTE: "m@8"}
    for name in ("PTV70", "SpinalCord"):  # a clinician's contour (SpinalCord: its imputation was empty)
        assert tags[name][IMPUTED_ATTRIBUTE] is None and tags[name][IMPUTED_BY_ATTRIBUTE] is None, name
    assert tags["PTV70"][ROLE_ATTRIBUTE] == "target" and tags["PTV70"][PRESCRIPTION_ATTRIBUTE] == "70.0"
    assert tags["possible_dose_mask"][ROLE_ATTRIBUTE] == "body"

    logic = SceneLogic(scene)
    roles = {r.name: r for r in logic.segment_roles(loaded.segmentation_node)}
    assert (roles["PTV56"].role, roles["PTV56"].prescription_gy) == ("target", 56.0)
    assert roles["Brainstem"].role == "oar"
    for name in ("Brainstem", "PTV56", "SpinalCord"):
        mask = logic.segment_mask(loaded.segmentation_node, segments[name], loaded.ct_node)
        np.testing.assert_array_equal(mask > 0, nifti_kji(imputed_case / f"{name}.nii.gz")[0] > 0)
