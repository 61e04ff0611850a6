"""Write a Case as a DICOM RT study: CT series, RTSTRUCT, RTPLAN (beam geometry) and RTDOSE.

All objects share one StudyInstanceUID and one FrameOfReferenceUID; the RTDOSE lies exactly on
the CT grid (same ImagePositionPatient, orientation and pixel spacing, GridFrameOffsetVector =
slice positions), so a planning system or 3D Slicer overlays it without resampling. Geometry
conventions (LPS <-> RAS, array axes) are described in `diffkt3d.io.dicom_common`. The CT series and
the export's frame are written here; RTSTRUCT, RTPLAN and RTDOSE by `diffkt3d.io.dicom_write_rt`,
every file's header and shared modules by `diffkt3d.io.dicom_write_modules`.

Precision promises (checked by tests/io/test_dicom_roundtrip.py):
    CT: HU rounded to int16 with RescaleSlope 1 / RescaleIntercept 0 (exact for integer HU).
    Dose: unsigned 16-bit (or 32-bit) with DoseGridScaling = max dose / (2**bits - 1), so the
        error is at most DoseGridScaling / 2 (1.2 mGy at 80 Gy with 16 bits).
    Structures: marching-squares contours at the 0.5 level of each mask slice, so a voxel centre
        lies inside a contour exactly when the voxel was in the mask (rasterising back by
        point-in-polygon gives the same mask up to contourpy's choice at saddle points).
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np

from diffkt3d.data.case import Case, Grid
from diffkt3d.errors import CaseError
from diffkt3d.io.dicom_common import CT_IMAGE_STORAGE, LPS_FROM_RAS, ds
from diffkt3d.io.dicom_write_modules import ExportUids, common_modules, file_dataset, image_plane
from diffkt3d.io.dicom_write_rt import write_rtdose, write_rtplan, write_rtstruct

log = logging.getLogger(__name__)


def _canonical_grid(case: Case) -> tuple[Grid, bool]:
    """Return the grid to encode and whether axis 2 must be reversed to get there.

    DICOM slices are stacked along row_dir x col_dir; if the case's axis 2 points the other way
    (a left-handed LPS index frame) we reverse it so GridFrameOffsetVector increases.

    Raises:
        CaseError: the in-plane axes are not orthogonal or slices are not stacked along the normal
            (sheared grid; DICOM cannot express it).
    """
    a_lps = LPS_FROM_RAS @ case.grid.affine
    spacing = np.asarray(case.grid.spacing_mm)
    dirs = a_lps[:3, :3] / spacing[None, :]
    normal = np.cross(dirs[:, 0], dirs[:, 1])
    if abs(float(dirs[:, 0] @ dirs[:, 1])) > 1e-4:
        raise CaseError("grid axes 0 and 1 are not orthogonal; DICOM images need an orthogonal "
                        f"in-plane frame (affine {case.grid.affine.tolist()})", case=case.case_id)
    cos_k = float(normal @ dirs[:, 2])
    if abs(abs(cos_k) - 1.0) > 1e-4:
        raise CaseError("slice axis 2 is not perpendicular to the image plane (sheared grid, "
                        f"cos = {cos_k:.4f}); DICOM cannot encode it", case=case.case_id)
    if cos_k > 0:
        return case.grid, False
    affine = case.grid.affine.copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (case.grid.shape[2] - 1)
    affine[:3, 2] *= -1.0
    return Grid(shape=case.grid.shape, affine=affine), True


def _write_ct(ct_hu: np.ndarray, grid: Grid, out_dir: Path, ctx: dict[str, str], uids: ExportUids,
              case_id: str) -> list[tuple[str, Path]]:
    """One CT Image file per slice; returns [(SOPInstanceUID, path)] in slice order."""
    rounded = np.rint(ct_hu)
    if not np.array_equal(rounded, ct_hu):
        log.info("case %s: CT HU rounded to integers for DICOM (max change %.3f HU)", case_id,
                 float(np.abs(rounded - ct_hu).max()))
    lo, hi = float(rounded.min()), float(rounded.max())
    if lo < -32768 or hi > 32767:
        raise CaseError(f"CT values {lo:.0f}..{hi:.0f} HU do not fit int16", case=case_id)
    ct16 = rounded.astype(np.int16)
    a_lps = LPS_FROM_RAS @ grid.affine
    series_uid = ctx["ct_series_uid"]
    written: list[tuple[str, Path]] = []
    for k in range(grid.shape[2]):
        sop_uid = uids.new("ct", k)
        path = out_dir / f"CT_{k + 1:04d}.dcm"
        fds = file_dataset(path, CT_IMAGE_STORAGE, sop_uid)
        common_modules(fds, ctx, "CT", series_uid, 1, "CT")
        fds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        fds.InstanceNumber = k + 1
        position = a_lps[:3, 3] + a_lps[:3, 2] * k
        fds.ImagePositionPatient = ds(position)
        fds.SliceLocation = ds(float(position @ (a_lps[:3, 2] / grid.spacing_mm[2])))
        image_plane(fds, grid)
        fds.BitsAllocated = 16
        fds.BitsStored = 16
        fds.HighBit = 15
        fds.PixelRepresentation = 1
        fds.RescaleIntercept = "0"
        fds.RescaleSlope = "1"
        fds.RescaleType = "HU"
        fds.KVP = ""
        fds.AcquisitionNumber = ""
        fds.PatientPosition = ""  # type 2: unknown here (the orientation is in ImageOrientationPatient)
        fds.PixelData = np.ascontiguousarray(ct16[:, :, k].T).astype("<i2").tobytes()
        fds.save_as(str(path), write_like_original=False)
        written.append((sop_uid, path))
    return written


def write_dicom_case(case: Case, out_dir: str | Path, *, patient_id: str | None = None,
                     patient_name: str | None = None, dose_bits: int = 16, overwrite: bool = False,
                     uid_seed: str | None = None) -> dict[str, list[Path]]:
    """Export a case as DICOM RT files in `out_dir` (CT_0001.dcm..., RS.dcm, RP.dcm, RD.dcm).

    Args:
        case: the case; CT is required (every other object references the CT frame).
        out_dir: folder to write; created if needed.
        patient_id, patient_name: DICOM patient identity (default: the case id and
            "DiffKT3D^<case id>"); never copy real identifiers into exported samples.
        dose_bits: 16 (default, 1.2 mGy steps at 80 Gy) or 32 bits per dose voxel.
        overwrite: replace *.dcm files already in out_dir (otherwise a non-empty folder is an
            error, since leftover slices of another case would make a mixed series).
        uid_seed: derive UIDs deterministically from this string (stable sample data); None gives
            fresh random UIDs.

    Returns:
        {"CT": [...], "RTSTRUCT": [...], "RTPLAN": [...], "RTDOSE": [...]} written paths.

    Raises:
        CaseError: no CT, non-empty out_dir, grid DICOM cannot encode, CT out of int16 range.
    """
    out_dir = Path(out_dir)
    if case.ct_hu is None:
        raise CaseError("cannot export DICOM without a CT (RTSTRUCT/RTDOSE reference the CT series)",
                        case=case.case_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.iterdir())
    if existing:
        if not overwrite:
            raise CaseError(f"output folder is not empty ({len(existing)} entries); choose an empty "
                            "folder or pass overwrite", case=case.case_id, file=str(out_dir))
        for p in existing:
            if p.is_file() and p.suffix.lower() == ".dcm":
                p.unlink()
    grid, flip = _canonical_grid(case)

    def oriented(arr: np.ndarray) -> np.ndarray:
        return arr[:, :, ::-1] if flip else arr

    uids = ExportUids(uid_seed)
    now = _dt.datetime.now()
    ctx = {
        "patient_id": patient_id or case.case_id,
        "patient_name": patient_name or f"DiffKT3D^{case.case_id}",
        "study_uid": uids.new("study"),
        "for_uid": uids.new("frame-of-reference"),
        "ct_series_uid": uids.new("ct-series"),
        "rs_uid": uids.new("rs"),
        "rp_uid": uids.new("rp"),
        "date": now.strftime("%Y%m%d"),
        "time": now.strftime("%H%M%S"),
        "study_description": f"DiffKT3D export of {case.case_id}",
    }
    written: dict[str, list[Path]] = {"CT": [], "RTSTRUCT": [], "RTPLAN": [], "RTDOSE": []}
    ct_files = _write_ct(oriented(case.ct_hu), grid, out_dir, ctx, uids, case.case_id)
    written["CT"] = [p for _, p in ct_files]
    rs_path, roi_numbers = write_rtstruct(case, grid, flip, ct_files, out_dir, ctx, uids)
    written["RTSTRUCT"] = [rs_path]
    if case.plan.beams is not None:
        written["RTPLAN"] = [write_rtplan(case, roi_numbers, out_dir, ctx, uids)]
    if case.dose_gy is not None:
        written["RTDOSE"] = [write_rtdose(oriented(case.dose_gy), grid, out_dir, ctx, uids, dose_bits,
                                           bool(written["RTPLAN"]), case.case_id)]
    log.info("case %s: wrote %d CT slices, %d structures%s%s to %s", case.case_id, len(ct_files),
             len(roi_numbers), ", RTPLAN" if written["RTPLAN"] else "",
             ", RTDOSE" if written["RTDOSE"] else "", out_dir)
    return written
