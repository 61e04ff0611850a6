"""Read the RT objects of a DICOM case onto the CT grid: RTSTRUCT masks, RTPLAN beams, RTDOSE.

Steps 4-6 of `diffkt3d.io.dicom_read.read_dicom_case`; each reader gets the CT geometry (LPS affine,
shape) from the CT series read before it and returns arrays in the CT's (columns, rows, slices)
layout. Geometry conventions are in `diffkt3d.io.dicom_common`.
"""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset
from scipy.interpolate import interp1d
from scipy.ndimage import affine_transform

from diffkt3d.data.case import BeamGeometry, infer_role
from diffkt3d.errors import CaseError
from diffkt3d.io.dicom_common import imputed_by_from_description, lps_affine, lps_to_ras
from diffkt3d.io.dicom_read_files import DicomFile, dicom_floats, dicom_pixels

log = logging.getLogger(__name__)

# A contour more than this many slice steps away from the nearest CT slice is rejected.
_CONTOUR_OFF_SLICE_TOL = 0.25
_TARGET_TYPES = {"PTV", "CTV", "GTV", "ITV"}
_CONTOUR_DATA_TAG = 0x30060050


# -- 4. RTSTRUCT ---------------------------------------------------------------------------------
def fill_polygon_xor(target: np.ndarray, polygon_ij: np.ndarray) -> None:
    """XOR into `target` (I, J) bool the voxels whose centres lie inside polygon (N, 2) (i, j).

    Even-odd combination: a contour inside another on the same slice makes a hole.
    """
    lo = np.maximum(np.floor(polygon_ij.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(polygon_ij.max(axis=0)).astype(int), np.asarray(target.shape) - 1)
    if np.any(hi < lo):
        return
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    inside = PolygonPath(polygon_ij).contains_points(np.column_stack([ii.ravel(), jj.ravel()]))
    target[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1] ^= inside.reshape(ii.shape)


def roi_role(name: str, interpreted: str) -> tuple[str, float | None, str]:
    """Role, name-derived prescription and where the role came from."""
    role, rx = infer_role(name)
    if role == "oar" and interpreted in _TARGET_TYPES:
        return "target", rx, f"RTROIInterpretedType {interpreted}"
    if role == "oar" and interpreted == "EXTERNAL":
        return "body", None, "RTROIInterpretedType EXTERNAL"
    return role, rx, "its name"


def _contour_data(contour: Dataset) -> np.ndarray:
    """ContourData as float64 (3N,); parses the raw DS bytes directly when still unparsed (a
    structure set holds ~10^5 numbers and pydicom's per-value DS objects are slow)."""
    if _CONTOUR_DATA_TAG not in contour:
        return np.zeros(0)
    elem = contour.get_item(_CONTOUR_DATA_TAG)
    if elem.is_raw and isinstance(elem.value, bytes):
        text = elem.value.decode("ascii", errors="replace").replace("\\", " ")
        try:
            return np.asarray(text.split(), dtype=np.float64)
        except ValueError:
            pass  # let pydicom parse (and report) unusual content
    return np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)


def read_rtstruct(f: DicomFile, grid_shape: tuple[int, int, int], affine_lps: np.ndarray,
                   case_id: str) -> list[tuple[int, str, str, np.ndarray, str | None]]:
    """Returns [(ROINumber, name, interpreted type, mask, imputed_by)] for ROIs with at least one voxel;
    imputed_by is the model version of an ROI DiffKT3D imputed (its ROIGenerationDescription), else None."""
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI{int(r.ROINumber)}"))
             for r in f.ds.get("StructureSetROISequence", [])}
    imputed = {int(r.ROINumber): imputed_by_from_description(str(r.get("ROIGenerationDescription", "") or ""))
               for r in f.ds.get("StructureSetROISequence", [])}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
             for o in f.ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}
    lps_to_index = np.linalg.inv(affine_lps)
    out = []
    for roi_contour in f.ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        name = names.get(number, f"ROI{number}")
        mask = np.zeros(grid_shape, dtype=bool)
        skipped = 0
        for contour in roi_contour.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            if kind != "CLOSED_PLANAR":
                continue  # POINT / OPEN_* contours enclose no volume
            try:
                data = _contour_data(contour)
            except (ValueError, TypeError) as exc:
                raise CaseError(f"ROI {name!r}: ContourData is not a list of numbers ({exc})",
                                case=case_id, file=str(f.path)) from None
            if data.size < 9 or data.size % 3:
                raise CaseError(f"ROI {name!r}: ContourData holds {data.size} numbers, expected a "
                                "multiple of 3 and at least 3 points", case=case_id, file=str(f.path))
            xyz = data.reshape(-1, 3)  # (N, 3) LPS mm
            ijk = xyz @ lps_to_index[:3, :3].T + lps_to_index[:3, 3]
            k_mean = float(ijk[:, 2].mean())
            k = int(round(k_mean))
            if np.ptp(ijk[:, 2]) > 2 * _CONTOUR_OFF_SLICE_TOL or abs(k - k_mean) > _CONTOUR_OFF_SLICE_TOL \
                    or not 0 <= k < grid_shape[2]:
                skipped += 1
                continue
            fill_polygon_xor(mask[:, :, k], ijk[:, :2])
        if skipped:
            log.warning("case %s: ROI %s: %d contours not on a CT slice (or outside the CT) ignored",
                        case_id, name, skipped)
        if not mask.any():
            log.warning("case %s: ROI %s has no voxels on the CT grid; skipped", case_id, name)
            continue
        out.append((number, name, types.get(number, ""), mask, imputed.get(number)))
    return out


# -- 5. RTPLAN -----------------------------------------------------------------------------------
def read_rtplan(f: DicomFile, case_id: str) -> tuple[BeamGeometry | None, int | None, dict[int, float]]:
    """(beam geometry, fractions, ROINumber -> prescription Gy) from an RT Plan."""
    prescriptions: dict[int, float] = {}
    for ref in f.ds.get("DoseReferenceSequence", []):
        if "ReferencedROINumber" in ref and ref.get("TargetPrescriptionDose") not in (None, ""):
            prescriptions[int(ref.ReferencedROINumber)] = float(ref.TargetPrescriptionDose)
    fractions = None
    groups = f.ds.get("FractionGroupSequence", [])
    if groups and groups[0].get("NumberOfFractionsPlanned") not in (None, ""):
        fractions = int(groups[0].NumberOfFractionsPlanned)

    angles: list[float] = []
    isocentre = None
    couch = 0.0
    vmat = False
    for beam in f.ds.get("BeamSequence", f.ds.get("IonBeamSequence", [])):
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")).upper() != "TREATMENT":
            continue  # setup / verification fields do not deliver dose
        cps = beam.get("ControlPointSequence", [])
        if not cps:
            continue
        cp0 = cps[0]
        rotating = str(cp0.get("GantryRotationDirection", "NONE")).upper() in ("CW", "CC")
        vmat = vmat or rotating
        beam_angles = [float(cp.GantryAngle) for cp in cps if cp.get("GantryAngle") not in (None, "")]
        if not beam_angles:
            raise CaseError(f"beam {beam.get('BeamNumber')} has no GantryAngle in its control points",
                            case=case_id, file=str(f.path))
        angles += beam_angles if rotating else beam_angles[:1]
        if isocentre is None and cp0.get("IsocenterPosition") is not None:
            isocentre = lps_to_ras(np.asarray([float(v) for v in cp0.IsocenterPosition]))
        couch = float(cp0.get("PatientSupportAngle", 0.0) or 0.0)
    if not angles:
        return None, fractions, prescriptions
    if isocentre is None:
        raise CaseError("RTPLAN has treatment beams but no IsocenterPosition", case=case_id,
                        file=str(f.path))
    beams = BeamGeometry(gantry_angles_deg=angles, isocenter_mm=tuple(float(v) for v in isocentre),
                         technique="VMAT" if vmat else "IMRT", couch_angle_deg=couch)
    return beams, fractions, prescriptions


# -- 6. RTDOSE -----------------------------------------------------------------------------------
def read_rtdose(f: DicomFile, ct_grid_lps: np.ndarray, ct_shape: tuple[int, int, int],
                 case_id: str) -> np.ndarray:
    """Dose (Gy) resampled trilinearly onto the CT voxel centres; (columns, rows, slices) float32."""
    units = str(f.ds.get("DoseUnits", "GY")).upper()
    if units != "GY":
        raise CaseError(f"DoseUnits is {units!r}; only absolute dose in GY is supported", case=case_id,
                        file=str(f.path))
    if "DoseGridScaling" not in f.ds:
        raise CaseError("RTDOSE has no DoseGridScaling", case=case_id, file=str(f.path))
    scaling = float(f.ds.DoseGridScaling)
    pixels = dicom_pixels(f, case_id).astype(np.float64) * scaling
    frames = int(f.ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != frames:
        raise CaseError(f"pixel data has {pixels.shape[0]} frames, NumberOfFrames says {frames}",
                        case=case_id, file=str(f.path))
    orient = dicom_floats(f, "ImageOrientationPatient", 6, case_id)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    position = dicom_floats(f, "ImagePositionPatient", 3, case_id)
    spacing = dicom_floats(f, "PixelSpacing", 2, case_id)
    if frames > 1:
        offsets = dicom_floats(f, "GridFrameOffsetVector", frames, case_id)
        # PS3.3 C.8.8.3.2: offsets are relative when the first is 0, else absolute along the normal
        if abs(offsets[0]) > 1e-6:
            offsets = offsets - float(position @ normal)
            if abs(offsets[0]) > 1e-3:
                raise CaseError(f"GridFrameOffsetVector starts at {offsets[0]:.3f} mm from "
                                "ImagePositionPatient; expected 0 (relative) or its z (absolute)",
                                case=case_id, file=str(f.path))
    else:
        offsets = np.zeros(1)
    volume = pixels.transpose(2, 1, 0)  # (columns, rows, frames)
    steps = np.diff(offsets)
    if frames > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
        raise CaseError("GridFrameOffsetVector is not monotonic", case=case_id, file=str(f.path))
    if frames > 1 and steps[0] < 0:
        offsets, volume, steps = offsets[::-1], volume[:, :, ::-1], -steps[::-1]
    frame_step = float(np.median(steps)) if frames > 1 else 1.0
    if frames > 1 and np.abs(steps - frame_step).max() > 1e-3 * frame_step:
        # uneven frames (rare): first resample along the normal to an even step
        frame_step = float(steps.min())
        even = offsets[0] + np.arange(int(np.floor((offsets[-1] - offsets[0]) / frame_step + 1e-6)) + 1) \
            * frame_step
        volume = interp1d(offsets, volume, axis=2, assume_sorted=True)(even)
        offsets = even
    position = position + normal * offsets[0]

    # dose index = inverse(dose affine) @ CT affine @ CT index; one affine, evaluated on the fly
    dose_affine = lps_affine(row_dir, col_dir, normal, (float(spacing[1]), float(spacing[0]), frame_step),
                             position)
    ct_to_dose = np.linalg.inv(dose_affine) @ ct_grid_lps
    snapped = np.round(ct_to_dose)
    near = np.abs(ct_to_dose - snapped) < 1e-6  # coincident grids copy values exactly
    ct_to_dose[near] = snapped[near]
    dose = affine_transform(volume, ct_to_dose[:3, :3], offset=ct_to_dose[:3, 3], output_shape=ct_shape,
                            order=1, mode="constant", cval=0.0, prefilter=False)
    log.debug("case %s: RTDOSE %s resampled onto the CT grid %s", case_id, volume.shape, ct_shape)
    return np.clip(dose, 0.0, None).astype(np.float32)
