"""Write the RT objects of a case on its (canonical) CT grid: RTSTRUCT, RTPLAN and RTDOSE.

Called by `diffkt3d.io.dicom_write.write_dicom_case` after the CT series, whose SOP instance UIDs
the structure set references slice by slice. Precision promises are listed in
`diffkt3d.io.dicom_write`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from contourpy import LineType, contour_generator
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from diffkt3d.data.case import Case, Grid
from diffkt3d.io.dicom_common import (
    CT_IMAGE_STORAGE,
    LPS_FROM_RAS,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    STUDY_COMPONENT_MANAGEMENT,
    ds,
    imputed_roi_description,
    ras_to_lps,
)
from diffkt3d.io.dicom_write_modules import ExportUids, common_modules, file_dataset, image_plane

log = logging.getLogger(__name__)

BODY_ROI_NAME = "BODY"
# Max tolerated quantisation error of the written dose (Gy): above it 16 bits give way to 32
# (the round trip is checked by tests/io/test_dicom_roundtrip.py).
MAX_DOSE_QUANTISATION_GY = 0.01
_COLOURS = [(255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255), (255, 120, 0),
            (0, 220, 200), (160, 80, 40), (255, 100, 160), (120, 120, 255), (180, 255, 60)]
CONTOUR_DATA_TAG = Tag(0x3006, 0x0050)


def _raw_ds(values: np.ndarray) -> RawDataElement:
    """ContourData as a pre-encoded DS element (0.1 micrometre precision, <= 16 chars each).

    A structure set holds ~10^5 numbers; pydicom's per-value DS objects and validation made
    writing 20x slower, and the encoded bytes are what the standard asks for anyway.
    """
    text = "\\".join(f"{v:.4f}" for v in np.asarray(values, dtype=np.float64))
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "  # DICOM values have even length; DS pads with a space
    return RawDataElement(CONTOUR_DATA_TAG, "DS", len(raw), raw, 0, False, True)


def _remove_collinear(points: np.ndarray) -> np.ndarray:
    """Drop vertices of a closed polygon that lie on a straight run (marching squares makes many)."""
    if len(points) < 4:
        return points
    prev = points - np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0) - points
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def mask_slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D mask at the 0.5 level (marching squares via contourpy).

    Args:
        mask2d: (I, J) bool slice.

    Returns:
        list of (N, 2) float arrays of (i, j) index coordinates, not repeating the first point.
        Outer boundaries and hole boundaries are both returned; the reader fills them even-odd.
    """
    padded = np.pad(mask2d.astype(np.float64), 1)  # zero border: every line closes
    lines = contour_generator(z=padded, line_type=LineType.Separate).lines(0.5)
    out = []
    for line in lines:  # (N, 2) as (x = axis 1 = j, y = axis 0 = i) of the padded array
        pts = line[:-1] if len(line) > 1 and np.allclose(line[0], line[-1]) else line
        if len(pts) < 3:
            continue
        ij = np.stack([pts[:, 1] - 1.0, pts[:, 0] - 1.0], axis=1)
        out.append(_remove_collinear(ij))
    return out


def _interpreted_type(name: str, role: str) -> str:
    if role == "body":
        return "EXTERNAL"
    if role == "target":
        upper = name.upper()
        for kind in ("PTV", "CTV", "GTV"):
            if upper.startswith(kind):
                return kind
        return "PTV"
    return "ORGAN" if role == "oar" else "CONTROL"


def write_rtstruct(case: Case, grid: Grid, flip: bool, ct_files: list[tuple[str, Path]],
                    out_dir: Path, ctx: dict[str, str], uids: ExportUids) -> tuple[Path, dict[str, int]]:
    """RTSTRUCT with one ROI per structure (and the body as EXTERNAL); returns path, name->ROINumber.

    An imputed structure (`Structure.imputed_by`) is marked where a planning system shows it:
    ROIGenerationAlgorithm AUTOMATIC, ROIGenerationDescription "IMPUTED by DiffKT3D, model <version>",
    and the StructureSetDescription lists the imputed ROIs. For the other ROIs DiffKT3D does not know
    how they were drawn, so ROIGenerationAlgorithm (type 2) is left empty rather than guessed.
    """
    path = out_dir / "RS.dcm"
    fds = file_dataset(path, RT_STRUCTURE_SET_STORAGE, ctx["rs_uid"])
    common_modules(fds, ctx, "RTSTRUCT", uids.new("rs-series"), 2, "DiffKT3D structures",
            frame_of_reference=False)
    fds.StructureSetLabel = "DiffKT3D"
    fds.StructureSetDate = ctx["date"]
    fds.StructureSetTime = ctx["time"]
    fds.InstanceNumber = 1

    contour_images = []
    for sop_uid, _ in ct_files:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = sop_uid
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = ctx["ct_series_uid"]
    series.ContourImageSequence = Sequence(contour_images)
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study.ReferencedSOPInstanceUID = ctx["study_uid"]
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ctx["for_uid"]
    frame.RTReferencedStudySequence = Sequence([study])
    fds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois: list[tuple[str, np.ndarray, str, str | None]] = []
    if case.body is not None:
        rois.append((BODY_ROI_NAME if BODY_ROI_NAME not in case.structures else "BODY_external",
                     case.body, "body", None))
    rois += [(s.name, s.mask, s.role, s.imputed_by) for s in case.structures.values()]
    imputed = [(name, by) for name, _, _, by in rois if by]
    if imputed:
        versions = sorted({by for _, by in imputed})
        fds.StructureSetDescription = (f"ROIs {', '.join(n for n, _ in imputed)} are IMPUTED by DiffKT3D "
                                       f"(model {', '.join(versions)}), not clinician contours")[:1024]

    a_lps = LPS_FROM_RAS @ grid.affine
    roi_items, contour_items, observation_items = [], [], []
    numbers: dict[str, int] = {}
    for number, (name, mask, role, imputed_by) in enumerate(rois, start=1):
        numbers[name] = number
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ctx["for_uid"]
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC" if imputed_by else ""
        if imputed_by:
            roi.ROIGenerationDescription = imputed_roi_description(imputed_by)
        roi_items.append(roi)

        mask = np.asarray(mask, dtype=bool)
        if flip:
            mask = mask[:, :, ::-1]
        contours = []
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for ij in mask_slice_contours(mask[:, :, k]):
                ijk = np.column_stack([ij, np.full(len(ij), float(k))])
                xyz = ijk @ a_lps[:3, :3].T + a_lps[:3, 3]  # (N, 3) LPS mm
                item = Dataset()
                ref = Dataset()
                ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                ref.ReferencedSOPInstanceUID = ct_files[k][0]
                item.ContourImageSequence = Sequence([ref])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(xyz)
                item[CONTOUR_DATA_TAG] = _raw_ds(xyz.ravel())
                contours.append(item)
        if not contours:
            log.warning("case %s: structure %s is empty; written without contours", case.case_id, name)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = Sequence(contours)
        contour_items.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _interpreted_type(name, role)
        obs.ROIInterpreter = ""
        observation_items.append(obs)
    fds.StructureSetROISequence = Sequence(roi_items)
    fds.ROIContourSequence = Sequence(contour_items)
    fds.RTROIObservationsSequence = Sequence(observation_items)
    fds.save_as(str(path), write_like_original=False)
    return path, numbers


def write_rtplan(case: Case, roi_numbers: dict[str, int], out_dir: Path, ctx: dict[str, str],
                  uids: ExportUids) -> Path:
    """RTPLAN carrying what DiffKT3D knows: beam angles, isocentre, technique, fractions, Rx.

    IMRT: one STATIC beam per gantry angle (2 control points). VMAT: one DYNAMIC arc whose
    control points are the listed gantry angles. No MLC/MU data: this plan is geometry, not a
    deliverable plan (RTPlanGeometry "PATIENT", approval UNAPPROVED).
    """
    beams = case.plan.beams
    assert beams is not None
    path = out_dir / "RP.dcm"
    fds = file_dataset(path, RT_PLAN_STORAGE, ctx["rp_uid"])
    common_modules(fds, ctx, "RTPLAN", uids.new("rp-series"), 3, "DiffKT3D plan geometry")
    fds.RTPlanLabel = "DiffKT3D"
    fds.RTPlanName = f"{case.case_id} geometry"
    fds.RTPlanDate = ctx["date"]
    fds.RTPlanTime = ctx["time"]
    fds.RTPlanGeometry = "PATIENT"
    fds.ApprovalStatus = "UNAPPROVED"
    fds.InstanceNumber = 1
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ref_ss.ReferencedSOPInstanceUID = ctx["rs_uid"]
    fds.ReferencedStructureSetSequence = Sequence([ref_ss])

    dose_refs = []
    for name, s in case.targets.items():
        if s.prescription_gy is None or name not in roi_numbers:
            continue
        item = Dataset()
        item.DoseReferenceNumber = len(dose_refs) + 1
        item.DoseReferenceUID = uids.new("doseref", name)
        item.DoseReferenceStructureType = "VOLUME"
        item.DoseReferenceDescription = name
        item.ReferencedROINumber = roi_numbers[name]
        item.DoseReferenceType = "TARGET"
        item.TargetPrescriptionDose = ds(float(s.prescription_gy))
        dose_refs.append(item)
    if dose_refs:
        fds.DoseReferenceSequence = Sequence(dose_refs)

    iso_lps = ds(ras_to_lps(np.asarray(beams.isocenter_mm, dtype=np.float64)))
    vmat = beams.technique.upper() == "VMAT"
    angle_groups = [list(beams.gantry_angles_deg)] if vmat else [[a] for a in beams.gantry_angles_deg]
    beam_items = []
    for number, angles in enumerate(angle_groups, start=1):
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = f"Arc{number}" if vmat else f"G{angles[0]:g}"
        beam.BeamType = "DYNAMIC" if vmat else "STATIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentMachineName = ""
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "1000"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        # a static field needs two control points (start and end of the same geometry)
        cp_angles = angles if vmat else angles * 2
        cps = []
        for index, angle in enumerate(cp_angles):
            cp = Dataset()
            cp.ControlPointIndex = index
            cp.CumulativeMetersetWeight = ds(index / max(len(cp_angles) - 1, 1))
            cp.GantryAngle = ds(float(angle) % 360.0)
            if index == 0:
                cp.NominalBeamEnergy = "6"
                cp.GantryRotationDirection = "CW" if vmat else "NONE"
                cp.BeamLimitingDeviceAngle = "0"
                cp.BeamLimitingDeviceRotationDirection = "NONE"
                cp.PatientSupportAngle = ds(float(beams.couch_angle_deg) % 360.0)
                cp.PatientSupportRotationDirection = "NONE"
                cp.TableTopEccentricAngle = "0"
                cp.TableTopEccentricRotationDirection = "NONE"
                cp.IsocenterPosition = iso_lps
            elif vmat:
                cp.GantryRotationDirection = "CW"
            cps.append(cp)
        beam.FinalCumulativeMetersetWeight = "1"
        beam.NumberOfControlPoints = len(cps)
        beam.ControlPointSequence = Sequence(cps)
        beam_items.append(beam)
    fds.BeamSequence = Sequence(beam_items)

    group = Dataset()
    group.FractionGroupNumber = 1
    if case.plan.fractions is not None:
        group.NumberOfFractionsPlanned = int(case.plan.fractions)
    group.NumberOfBeams = len(beam_items)
    group.NumberOfBrachyApplicationSetups = 0
    refs = []
    for beam in beam_items:
        ref = Dataset()
        ref.ReferencedBeamNumber = beam.BeamNumber
        refs.append(ref)
    group.ReferencedBeamSequence = Sequence(refs)
    fds.FractionGroupSequence = Sequence([group])
    fds.save_as(str(path), write_like_original=False)
    return path


def dose_grid_scaling(max_dose_gy: float, bits: int) -> float:
    """Gy per stored unit so that the maximum dose uses the full unsigned range of `bits`."""
    return max(float(max_dose_gy), 1e-6) / float(2**bits - 1)


def write_rtdose(dose_gy: np.ndarray, grid: Grid, out_dir: Path, ctx: dict[str, str], uids: ExportUids,
                  bits: int, plan_written: bool, case_id: str) -> Path:
    """Multi-frame RTDOSE on the CT grid (frames = CT slices, same IPP/orientation/spacing)."""
    if bits not in (16, 32):
        raise ValueError(f"dose_bits must be 16 or 32, got {bits}")
    dose = np.clip(np.asarray(dose_gy, dtype=np.float64), 0.0, None)
    scaling = dose_grid_scaling(float(dose.max()), bits)
    if scaling / 2 > MAX_DOSE_QUANTISATION_GY and bits == 16:
        bits, scaling = 32, dose_grid_scaling(float(dose.max()), 32)
    stored = np.rint(dose / scaling).astype(np.uint16 if bits == 16 else np.uint32)
    log.debug("case %s: DoseGridScaling %.3g Gy (max quantisation error %.3g Gy)", case_id, scaling,
              scaling / 2)

    path = out_dir / "RD.dcm"
    fds = file_dataset(path, RT_DOSE_STORAGE, uids.new("rd"))
    common_modules(fds, ctx, "RTDOSE", uids.new("rd-series"), 4, "DiffKT3D dose")
    fds.InstanceNumber = 1
    a_lps = LPS_FROM_RAS @ grid.affine
    fds.ImagePositionPatient = ds(a_lps[:3, 3])
    image_plane(fds, grid)
    fds.NumberOfFrames = grid.shape[2]
    fds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)  # GridFrameOffsetVector
    fds.GridFrameOffsetVector = ds(np.arange(grid.shape[2]) * grid.spacing_mm[2])
    fds.BitsAllocated = bits
    fds.BitsStored = bits
    fds.HighBit = bits - 1
    fds.PixelRepresentation = 0
    fds.DoseUnits = "GY"
    fds.DoseType = "PHYSICAL"
    fds.DoseSummationType = "PLAN"
    fds.DoseGridScaling = ds(scaling)
    if plan_written:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
        ref.ReferencedSOPInstanceUID = ctx["rp_uid"]
        fds.ReferencedRTPlanSequence = Sequence([ref])
    frames = np.ascontiguousarray(stored.transpose(2, 1, 0))  # (frames, rows, columns)
    fds.PixelData = frames.astype("<u2" if bits == 16 else "<u4").tobytes()
    fds.save_as(str(path), write_like_original=False)
    return path
