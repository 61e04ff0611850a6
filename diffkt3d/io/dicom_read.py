"""Read a DICOM RT folder (CT series + RTSTRUCT + RTPLAN + RTDOSE) into a Case on the CT grid.

Steps of `read_dicom_case`:
    1. Parse every file under the folder; a non-DICOM or truncated file is a CaseError naming it.
    2. Group by modality; exactly one CT series; every object must share the CT's
       FrameOfReferenceUID (a mixed export would put contours/dose in the wrong place).
    3. CT: sort slices along the normal of ImageOrientationPatient, check one orientation, one
       pixel spacing, one size and an even slice step, apply RescaleSlope/Intercept -> HU.
    4. RTSTRUCT: each CLOSED_PLANAR contour is filled on its slice (voxel centres inside the
       polygon); several contours on one slice combine even-odd (XOR), which turns an inner
       contour into a hole.
    5. RTPLAN: gantry angles, isocentre, couch, IMRT vs VMAT (rotating control points), number of
       fractions, prescriptions from DoseReferenceSequence.TargetPrescriptionDose.
    6. RTDOSE: DoseGridScaling * pixels, placed by ImagePositionPatient + GridFrameOffsetVector,
       resampled trilinearly onto the CT voxel centres (zero outside the dose grid).
Steps 1-3 and the assembly into a Case are here; parsing one file and reading its attributes with
errors that name it is `diffkt3d.io.dicom_read_files`, steps 4-6 are `diffkt3d.io.dicom_read_rt`.
Geometry conventions (LPS -> RAS at this boundary, array axes) are in `diffkt3d.io.dicom_common`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from diffkt3d.constants import OPENKBP_FRACTIONS, OPENKBP_GANTRY_ANGLES_DEG
from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import default_isocenter_mm
from diffkt3d.io.dicom_common import LPS_FROM_RAS, lps_affine
from diffkt3d.io.dicom_read_files import DicomFile, dicom_floats, dicom_pixels, malformed, read_dicom_file
from diffkt3d.io.dicom_read_rt import read_rtdose, read_rtplan, read_rtstruct, roi_role
from diffkt3d.io.image_guard import ImageLimits, check_dicom_volume

log = logging.getLogger(__name__)

# Tolerances: orientation cosines, relative slice-step variation, in-plane drift of slices (mm).
_ORIENT_TOL = 1e-4
_STEP_REL_TOL = 0.01
_INPLANE_TOL_MM = 0.01


# -- 1-2. parse and group ------------------------------------------------------------------------
def _scan(folder: Path, case_id: str) -> dict[str, list[DicomFile]]:
    # hidden files (.DS_Store, editor swap files) are never DICOM data; every other file must be
    paths = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise CaseError("DICOM folder is empty", case=case_id, file=str(folder))
    by_modality: dict[str, list[DicomFile]] = {}
    for path in paths:
        dataset = read_dicom_file(path, case_id)
        if dataset is not None:
            by_modality.setdefault(str(dataset.Modality).upper(), []).append(DicomFile(path, dataset))
    return by_modality


def _frame_of_reference(f: DicomFile) -> str | None:
    if "FrameOfReferenceUID" in f.ds:
        return str(f.ds.FrameOfReferenceUID)
    refs = f.ds.get("ReferencedFrameOfReferenceSequence")
    if refs:
        return str(refs[0].get("FrameOfReferenceUID", "")) or None
    return None


def _check_frame(f: DicomFile, ct_frame: str, ct_file: Path, case_id: str) -> None:
    frame = _frame_of_reference(f)
    if frame is not None and frame != ct_frame:
        raise CaseError(f"{f.ds.Modality} FrameOfReferenceUID {frame} differs from the CT's {ct_frame} "
                        f"({ct_file.name}); the files come from different patients/registrations",
                        case=case_id, file=str(f.path))


def _single(files: list[DicomFile], modality: str, case_id: str) -> DicomFile | None:
    if not files:
        return None
    if len(files) > 1:
        names = ", ".join(f.path.name for f in files[:5])
        raise CaseError(f"{len(files)} {modality} files found ({names}); keep exactly one per case",
                        case=case_id, file=str(files[1].path))
    return files[0]


# -- 3. CT series --------------------------------------------------------------------------------
def _read_ct(files: list[DicomFile], case_id: str, limits: ImageLimits) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ct_hu (columns, rows, slices) float32, 4x4 LPS affine)."""
    series = {str(f.ds.get("SeriesInstanceUID", "")) for f in files}
    if len(series) > 1:
        raise CaseError(f"CT files belong to {len(series)} different series (SeriesInstanceUID); keep "
                        "one CT series per case folder", case=case_id, file=str(files[0].path))
    first = files[0]
    orient = dicom_floats(first, "ImageOrientationPatient", 6, case_id)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    spacing = dicom_floats(first, "PixelSpacing", 2, case_id)  # [between rows, between columns]
    with malformed(first, case_id, "CT image (Rows/Columns)"):
        size = (int(first.ds.Rows), int(first.ds.Columns))
    positions = []
    for f in files:
        if not np.allclose(dicom_floats(f, "ImageOrientationPatient", 6, case_id), orient, atol=_ORIENT_TOL):
            raise CaseError(f"ImageOrientationPatient differs from {first.path.name} "
                            f"({list(orient)}); one CT series must have one orientation",
                            case=case_id, file=str(f.path))
        if not np.allclose(dicom_floats(f, "PixelSpacing", 2, case_id), spacing, rtol=1e-5):
            raise CaseError(f"PixelSpacing differs from {first.path.name} ({list(spacing)} mm)",
                            case=case_id, file=str(f.path))
        with malformed(f, case_id, "CT image (Rows/Columns)"):
            f_size = (int(f.ds.Rows), int(f.ds.Columns))
        if f_size != size:
            raise CaseError(f"image size {f_size[0]}x{f_size[1]} differs from "
                            f"{first.path.name} ({size[0]}x{size[1]})", case=case_id, file=str(f.path))
        positions.append(dicom_floats(f, "ImagePositionPatient", 3, case_id))
    positions_arr = np.asarray(positions)  # (S, 3) LPS mm
    along = positions_arr @ normal
    order = np.argsort(along, kind="stable")
    files = [files[i] for i in order]
    positions_arr, along = positions_arr[order], along[order]
    if len(files) > 1:
        steps = np.diff(along)
        if steps.min() < 1e-3:
            dup = files[int(np.argmin(steps)) + 1]
            raise CaseError(f"two CT slices at the same position ({along[int(np.argmin(steps))]:.3f} mm "
                            "along the slice normal)", case=case_id, file=str(dup.path))
        step = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - step) > _STEP_REL_TOL * step)
        if bad.size:
            i = int(bad[0])
            raise CaseError(f"uneven CT slice spacing: {steps[i]:.3f} mm between {files[i].path.name} and "
                            f"{files[i + 1].path.name}, expected {step:.3f} mm (missing slice?)",
                            case=case_id, file=str(files[i + 1].path))
        drift = positions_arr - positions_arr[0] - np.outer(along - along[0], normal)
        if np.abs(drift).max() > _INPLANE_TOL_MM + 1e-3 * step:
            raise CaseError("CT slices are not stacked along the image normal (gantry tilt or sheared "
                            "series); resample the series first", case=case_id, file=str(files[-1].path))
    else:
        step = float(first.ds.get("SliceThickness") or 1.0)
        log.warning("case %s: CT has a single slice; slice step taken from SliceThickness (%g mm)",
                    case_id, step)

    with malformed(first, case_id, "CT image (SamplesPerPixel)"):
        samples = int(first.ds.get("SamplesPerPixel", 1) or 1)
    check_dicom_volume((size[1], size[0], len(files)), 4, samples, limits, case_id, first.path, "CT series")
    volume = np.empty((size[1], size[0], len(files)), dtype=np.float32)
    for k, f in enumerate(files):
        with malformed(f, case_id, "CT image (RescaleSlope/RescaleIntercept)"):
            slope = float(f.ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(f.ds.get("RescaleIntercept", 0.0) or 0.0)
        pixels = dicom_pixels(f, case_id)
        if pixels.shape != size:
            raise CaseError(f"pixel array shape {pixels.shape}, expected {size}", case=case_id,
                            file=str(f.path))
        volume[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    affine = lps_affine(row_dir, col_dir, normal, (float(spacing[1]), float(spacing[0]), step),
                        positions_arr[0])
    return volume, affine


# -- public ----------------------------------------------------------------------------------------
def read_dicom_case(folder: str | Path, *, with_dose: bool = True, case_id: str | None = None,
                    limits: ImageLimits | None = None) -> Case:
    """Read a DICOM RT case folder into a Case on the CT grid.

    Args:
        folder: folder holding one CT series and optionally one RTSTRUCT, one RTPLAN, RTDOSE
            file(s); subfolders are searched too. Every file must be DICOM, except hidden files
            (names starting with ".") and a DICOMDIR, which are skipped.
        with_dose: read RTDOSE (False for prediction input).
        case_id: case id (default: the folder name).
        limits: size limits checked from the headers before pixel data are decoded (default:
            ImageLimits.from_env(), as for NIfTI).

    Returns:
        Case with grid (columns, rows, slices) in RAS+, ct_hu, body (EXTERNAL / body-named ROI),
        structures, dose_gy, plan (beams, fractions; every guess listed in plan.inferred).

    Raises:
        CaseError: non-DICOM or truncated file, no CT, several CT series, inconsistent CT
            geometry, objects on a different FrameOfReferenceUID, malformed RT objects.
    """
    folder = Path(folder)
    case_id = case_id or folder.name
    if not folder.is_dir():
        raise CaseError("DICOM folder does not exist", case=case_id, file=str(folder))
    by_modality = _scan(folder, case_id)
    ct_files = by_modality.pop("CT", [])
    if not ct_files:
        found = ", ".join(f"{m} x{len(v)}" for m, v in sorted(by_modality.items())) or "nothing"
        raise CaseError(f"no CT image series in the DICOM folder (found {found})", case=case_id,
                        file=str(folder))
    ct_frame = _frame_of_reference(ct_files[0])
    for f in ct_files:
        if _frame_of_reference(f) != ct_frame:
            raise CaseError(f"CT FrameOfReferenceUID {_frame_of_reference(f)} differs from "
                            f"{ct_files[0].path.name} ({ct_frame})", case=case_id, file=str(f.path))
    rs = _single(by_modality.pop("RTSTRUCT", []), "RTSTRUCT", case_id)
    rp = _single(by_modality.pop("RTPLAN", []), "RTPLAN", case_id)
    rd_files = by_modality.pop("RTDOSE", [])
    for modality, files in by_modality.items():
        log.warning("case %s: ignoring %d %s file(s) (e.g. %s)", case_id, len(files), modality,
                    files[0].path.name)
    for f in [x for x in (rs, rp) if x is not None] + rd_files:
        if ct_frame is not None:
            _check_frame(f, ct_frame, ct_files[0].path, case_id)

    limits = limits or ImageLimits.from_env()
    ct_hu, affine_lps = _read_ct(ct_files, case_id, limits)
    grid = Grid(shape=tuple(int(s) for s in ct_hu.shape), affine=LPS_FROM_RAS @ affine_lps)  # RAS+
    inferred: list[str] = []

    beams, fractions, prescriptions = None, None, {}
    if rp is not None:
        with malformed(rp, case_id, "RTPLAN"):
            beams, fractions, prescriptions = read_rtplan(rp, case_id)
    body = None
    structures: dict[str, Structure] = {}
    if rs is not None:
        with malformed(rs, case_id, "RTSTRUCT"):
            rois = read_rtstruct(rs, grid.shape, affine_lps, case_id)
        for number, name, interpreted, mask, imputed_by in rois:
            role, rx, source = roi_role(name, interpreted)
            if number in prescriptions:
                role, rx = "target", prescriptions[number]
                inferred.append(f"{name}: target, prescription {rx:g} Gy from RTPLAN DoseReference")
            else:
                inferred.append(f"{name}: role '{role}' from {source}"
                                + (f", prescription {rx:g} Gy from its name" if rx is not None else ""))
            if role == "body" and body is None:
                body = mask
                continue
            if name in structures:
                raise CaseError(f"two ROIs are named {name!r}", case=case_id, file=str(rs.path))
            structures[name] = Structure(name=name, mask=mask, role=role,  # type: ignore[arg-type]
                                         prescription_gy=rx if role == "target" else None, imputed_by=imputed_by)
    else:
        log.info("case %s: no RTSTRUCT; the case has no structures", case_id)

    dose = None
    if with_dose and rd_files:
        plan_doses = [f for f in rd_files if str(f.ds.get("DoseSummationType", "")).upper() == "PLAN"]
        use = plan_doses[:1] if plan_doses else rd_files
        if len(plan_doses) > 1:
            log.warning("case %s: %d PLAN RTDOSE files; using %s", case_id, len(plan_doses),
                        plan_doses[0].path.name)
        dose = np.zeros(grid.shape, dtype=np.float32)
        for f in use:
            with malformed(f, case_id, "RTDOSE"):
                frames = int(f.ds.get("NumberOfFrames", 1) or 1)
                dose_shape = (frames, int(f.ds.Rows), int(f.ds.Columns))
                samples = int(f.ds.get("SamplesPerPixel", 1) or 1)
            # read_rtdose scales the pixels in float64: 8 bytes per voxel
            check_dicom_volume(dose_shape, 8, samples, limits, case_id, f.path, "RTDOSE grid")
            with malformed(f, case_id, "RTDOSE"):
                dose += read_rtdose(f, affine_lps, grid.shape, case_id)
        if len(use) > 1:
            inferred.append(f"dose: sum of {len(use)} RTDOSE files (no PLAN-summed dose)")

    case = Case(case_id=case_id, grid=grid, ct_hu=ct_hu, dose_gy=dose, body=body, structures=structures,
                source=str(folder))
    if beams is None and case.targets:
        beams = BeamGeometry(gantry_angles_deg=list(OPENKBP_GANTRY_ANGLES_DEG),
                             isocenter_mm=default_isocenter_mm(case), technique="IMRT")
        inferred.append("beams: no RTPLAN beams; OpenKBP preset, 9 coplanar IMRT fields at 0-320 deg, "
                        "isocentre at the target centroid")
    if fractions is None and any(n.upper().startswith("PTV") for n in case.targets):
        fractions = OPENKBP_FRACTIONS
        inferred.append(f"fractions: {OPENKBP_FRACTIONS} (OpenKBP preset; RTPLAN gives none)")
    case.plan = Plan(beams=beams, fractions=fractions, inferred=inferred)
    case.validate()
    return case
