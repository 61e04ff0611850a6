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
Geometry conventions (LPS -> RAS at this boundary, array axes) are in `diffkt3d.io.dicom_common`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy.interpolate import interp1d
from scipy.ndimage import affine_transform

from diffkt3d.constants import OPENKBP_FRACTIONS, OPENKBP_GANTRY_ANGLES_DEG
from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure, infer_role
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import default_isocenter_mm
from diffkt3d.io.dicom_common import LPS_FROM_RAS, lps_affine, lps_to_ras

log = logging.getLogger(__name__)

# Tolerances: orientation cosines, relative slice-step variation, in-plane drift of slices (mm).
_ORIENT_TOL = 1e-4
_STEP_REL_TOL = 0.01
_INPLANE_TOL_MM = 0.01
# A contour more than this many slice steps away from the nearest CT slice is rejected.
_CONTOUR_OFF_SLICE_TOL = 0.25
_TARGET_TYPES = {"PTV", "CTV", "GTV", "ITV"}
_CONTOUR_DATA_TAG = 0x30060050
_SKIPPED_SOP_CLASSES = {"1.2.840.10008.1.3.10"}  # Media Storage Directory (DICOMDIR)


@dataclass
class _File:
    path: Path
    ds: Dataset


@contextmanager
def _malformed(f: _File, case_id: str, what: str) -> Iterator[None]:
    """Turn a missing/ill-typed attribute deep in an RT object into a CaseError naming the file."""
    try:
        yield
    except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CaseError(f"malformed {what} ({type(exc).__name__}: {exc})", case=case_id,
                        file=str(f.path)) from None


def _read_file(path: Path, case_id: str) -> Dataset | None:
    """Parse one file fully; None for a DICOMDIR. Any failure -> CaseError naming the file."""
    try:
        try:
            dataset = pydicom.dcmread(str(path))
        except InvalidDicomError:
            # old exporters write datasets without the 128-byte preamble + "DICM"; accept those
            # only if they parse to something with a SOP class and a modality
            try:
                dataset = pydicom.dcmread(str(path), force=True)
                looks_dicom = "SOPClassUID" in dataset and "Modality" in dataset
            except Exception:  # garbage parsed as tags can fail anywhere in pydicom
                looks_dicom = False
            if not looks_dicom:
                raise InvalidDicomError("no DICOM header") from None
            log.debug("case %s: %s has no DICOM preamble; read without it", case_id, path.name)
    except InvalidDicomError:
        raise CaseError("not a DICOM file (no DICM preamble/prefix); remove it from the DICOM folder",
                        case=case_id, file=str(path)) from None
    except Exception as exc:  # EOFError, OSError, struct.error, ValueError ... from pydicom's parser
        raise CaseError(f"cannot parse DICOM file (truncated or corrupt: {type(exc).__name__}: {exc})",
                        case=case_id, file=str(path)) from None
    meta = getattr(dataset, "file_meta", None)
    meta_class = meta.get("MediaStorageSOPClassUID", "") if meta else ""
    sop_class = str(dataset.get("SOPClassUID", "") or meta_class)
    if sop_class in _SKIPPED_SOP_CLASSES:
        return None
    if "Modality" not in dataset:
        raise CaseError("DICOM file has no Modality (0008,0060) (truncated header?); cannot tell "
                        "CT/RTSTRUCT/RTPLAN/RTDOSE",
                        case=case_id, file=str(path))
    return dataset


def _pixels(f: _File, case_id: str) -> np.ndarray:
    """pixel_array with truncation / missing-data errors turned into CaseError."""
    if "PixelData" not in f.ds:
        raise CaseError(f"{f.ds.Modality} file has no pixel data", case=case_id, file=str(f.path))
    try:
        return np.asarray(f.ds.pixel_array)
    except Exception as exc:  # pydicom raises ValueError/NotImplementedError/RuntimeError here
        raise CaseError(f"cannot decode pixel data (truncated file or unsupported transfer syntax: "
                        f"{exc})", case=case_id, file=str(f.path)) from None


def _floats(f: _File, keyword: str, n: int, case_id: str) -> np.ndarray:
    value = f.ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if value is None or arr.size != n:
        raise CaseError(f"{keyword} must hold {n} numbers, found {value!r}", case=case_id, file=str(f.path))
    return arr


# -- 1-2. parse and group ------------------------------------------------------------------------
def _scan(folder: Path, case_id: str) -> dict[str, list[_File]]:
    # hidden files (.DS_Store, editor swap files) are never DICOM data; every other file must be
    paths = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise CaseError("DICOM folder is empty", case=case_id, file=str(folder))
    by_modality: dict[str, list[_File]] = {}
    for path in paths:
        dataset = _read_file(path, case_id)
        if dataset is not None:
            by_modality.setdefault(str(dataset.Modality).upper(), []).append(_File(path, dataset))
    return by_modality


def _frame_of_reference(f: _File) -> str | None:
    if "FrameOfReferenceUID" in f.ds:
        return str(f.ds.FrameOfReferenceUID)
    refs = f.ds.get("ReferencedFrameOfReferenceSequence")
    if refs:
        return str(refs[0].get("FrameOfReferenceUID", "")) or None
    return None


def _check_frame(f: _File, ct_frame: str, ct_file: Path, case_id: str) -> None:
    frame = _frame_of_reference(f)
    if frame is not None and frame != ct_frame:
        raise CaseError(f"{f.ds.Modality} FrameOfReferenceUID {frame} differs from the CT's {ct_frame} "
                        f"({ct_file.name}); the files come from different patients/registrations",
                        case=case_id, file=str(f.path))


def _single(files: list[_File], modality: str, case_id: str) -> _File | None:
    if not files:
        return None
    if len(files) > 1:
        names = ", ".join(f.path.name for f in files[:5])
        raise CaseError(f"{len(files)} {modality} files found ({names}); keep exactly one per case",
                        case=case_id, file=str(files[1].path))
    return files[0]


# -- 3. CT series --------------------------------------------------------------------------------
def _read_ct(files: list[_File], case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ct_hu (columns, rows, slices) float32, 4x4 LPS affine)."""
    series = {str(f.ds.get("SeriesInstanceUID", "")) for f in files}
    if len(series) > 1:
        raise CaseError(f"CT files belong to {len(series)} different series (SeriesInstanceUID); keep "
                        "one CT series per case folder", case=case_id, file=str(files[0].path))
    first = files[0]
    orient = _floats(first, "ImageOrientationPatient", 6, case_id)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    spacing = _floats(first, "PixelSpacing", 2, case_id)  # [between rows, between columns]
    with _malformed(first, case_id, "CT image (Rows/Columns)"):
        size = (int(first.ds.Rows), int(first.ds.Columns))
    positions = []
    for f in files:
        if not np.allclose(_floats(f, "ImageOrientationPatient", 6, case_id), orient, atol=_ORIENT_TOL):
            raise CaseError(f"ImageOrientationPatient differs from {first.path.name} "
                            f"({list(orient)}); one CT series must have one orientation",
                            case=case_id, file=str(f.path))
        if not np.allclose(_floats(f, "PixelSpacing", 2, case_id), spacing, rtol=1e-5):
            raise CaseError(f"PixelSpacing differs from {first.path.name} ({list(spacing)} mm)",
                            case=case_id, file=str(f.path))
        with _malformed(f, case_id, "CT image (Rows/Columns)"):
            f_size = (int(f.ds.Rows), int(f.ds.Columns))
        if f_size != size:
            raise CaseError(f"image size {f_size[0]}x{f_size[1]} differs from "
                            f"{first.path.name} ({size[0]}x{size[1]})", case=case_id, file=str(f.path))
        positions.append(_floats(f, "ImagePositionPatient", 3, case_id))
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

    volume = np.empty((size[1], size[0], len(files)), dtype=np.float32)
    for k, f in enumerate(files):
        with _malformed(f, case_id, "CT image (RescaleSlope/RescaleIntercept)"):
            slope = float(f.ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(f.ds.get("RescaleIntercept", 0.0) or 0.0)
        pixels = _pixels(f, case_id)
        if pixels.shape != size:
            raise CaseError(f"pixel array shape {pixels.shape}, expected {size}", case=case_id,
                            file=str(f.path))
        volume[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    affine = lps_affine(row_dir, col_dir, normal, (float(spacing[1]), float(spacing[0]), step),
                        positions_arr[0])
    return volume, affine


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


def _roi_role(name: str, interpreted: str) -> tuple[str, float | None, str]:
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


def _read_rtstruct(f: _File, grid_shape: tuple[int, int, int], affine_lps: np.ndarray,
                   case_id: str) -> list[tuple[int, str, str, np.ndarray]]:
    """Returns [(ROINumber, name, interpreted type, mask)] for ROIs with at least one voxel."""
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI{int(r.ROINumber)}"))
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
        out.append((number, name, types.get(number, ""), mask))
    return out


# -- 5. RTPLAN -----------------------------------------------------------------------------------
def _read_rtplan(f: _File, case_id: str) -> tuple[BeamGeometry | None, int | None, dict[int, float]]:
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
def _read_rtdose(f: _File, ct_grid_lps: np.ndarray, ct_shape: tuple[int, int, int],
                 case_id: str) -> np.ndarray:
    """Dose (Gy) resampled trilinearly onto the CT voxel centres; (columns, rows, slices) float32."""
    units = str(f.ds.get("DoseUnits", "GY")).upper()
    if units != "GY":
        raise CaseError(f"DoseUnits is {units!r}; only absolute dose in GY is supported", case=case_id,
                        file=str(f.path))
    if "DoseGridScaling" not in f.ds:
        raise CaseError("RTDOSE has no DoseGridScaling", case=case_id, file=str(f.path))
    scaling = float(f.ds.DoseGridScaling)
    pixels = _pixels(f, case_id).astype(np.float64) * scaling
    frames = int(f.ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != frames:
        raise CaseError(f"pixel data has {pixels.shape[0]} frames, NumberOfFrames says {frames}",
                        case=case_id, file=str(f.path))
    orient = _floats(f, "ImageOrientationPatient", 6, case_id)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    position = _floats(f, "ImagePositionPatient", 3, case_id)
    spacing = _floats(f, "PixelSpacing", 2, case_id)
    if frames > 1:
        offsets = _floats(f, "GridFrameOffsetVector", frames, case_id)
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


# -- public ----------------------------------------------------------------------------------------
def read_dicom_case(folder: str | Path, *, with_dose: bool = True, case_id: str | None = None) -> Case:
    """Read a DICOM RT case folder into a Case on the CT grid.

    Args:
        folder: folder holding one CT series and optionally one RTSTRUCT, one RTPLAN, RTDOSE
            file(s); subfolders are searched too. Every file must be DICOM, except hidden files
            (names starting with ".") and a DICOMDIR, which are skipped.
        with_dose: read RTDOSE (False for prediction input).
        case_id: case id (default: the folder name).

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

    ct_hu, affine_lps = _read_ct(ct_files, case_id)
    grid = Grid(shape=tuple(int(s) for s in ct_hu.shape), affine=LPS_FROM_RAS @ affine_lps)  # RAS+
    inferred: list[str] = []

    beams, fractions, prescriptions = None, None, {}
    if rp is not None:
        with _malformed(rp, case_id, "RTPLAN"):
            beams, fractions, prescriptions = _read_rtplan(rp, case_id)
    body = None
    structures: dict[str, Structure] = {}
    if rs is not None:
        with _malformed(rs, case_id, "RTSTRUCT"):
            rois = _read_rtstruct(rs, grid.shape, affine_lps, case_id)
        for number, name, interpreted, mask in rois:
            role, rx, source = _roi_role(name, interpreted)
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
                                         prescription_gy=rx if role == "target" else None)
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
            with _malformed(f, case_id, "RTDOSE"):
                dose += _read_rtdose(f, affine_lps, grid.shape, case_id)
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
