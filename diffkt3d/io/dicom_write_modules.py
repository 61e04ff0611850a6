"""What every written DICOM object shares: export UIDs, the file header, patient/study/series modules
and the image plane.

The writers of `diffkt3d.io.dicom_write` (CT series) and `diffkt3d.io.dicom_write_rt` (RTSTRUCT,
RTPLAN, RTDOSE) build each file from these, so all objects of one export agree on patient, study,
frame of reference and (for CT and RTDOSE) the image plane.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from diffkt3d.data.case import Grid
from diffkt3d.io.dicom_common import LPS_FROM_RAS, ds


class ExportUids:
    """UIDs of one export; deterministic when `seed` is given (stable sample data in git)."""

    def __init__(self, seed: str | None):
        self.seed = seed

    def new(self, *parts: object) -> str:
        if self.seed is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[self.seed, *(str(p) for p in parts)])


def file_dataset(path: Path, sop_class: str, sop_instance: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    fds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    fds.is_little_endian = True
    fds.is_implicit_VR = False
    fds.SOPClassUID = sop_class
    fds.SOPInstanceUID = sop_instance
    fds.SpecificCharacterSet = "ISO_IR 100"
    return fds


def common_modules(fds: Dataset, ctx: dict[str, str], modality: str, series_uid: str, series_number: int,
            description: str, frame_of_reference: bool = True) -> None:
    """Patient, study, series, equipment and frame-of-reference modules shared by every file.

    The RT Structure Set IOD has no Frame of Reference module (its frame is named inside
    ReferencedFrameOfReferenceSequence), hence `frame_of_reference=False` there.
    """
    fds.PatientName = ctx["patient_name"]
    fds.PatientID = ctx["patient_id"]
    fds.PatientBirthDate = ""
    fds.PatientSex = ""
    fds.StudyInstanceUID = ctx["study_uid"]
    fds.StudyDate = ctx["date"]
    fds.StudyTime = ctx["time"]
    fds.StudyID = "1"
    fds.AccessionNumber = ""
    fds.ReferringPhysicianName = ""
    fds.StudyDescription = ctx["study_description"]
    fds.Modality = modality
    fds.SeriesInstanceUID = series_uid
    fds.SeriesNumber = series_number
    fds.SeriesDescription = description
    fds.Manufacturer = "DiffKT3D"
    if modality.startswith("RT"):
        fds.OperatorsName = ""  # type 2 in the RT Series module (RTSTRUCT, RTPLAN, RTDOSE): present, unknown
    if frame_of_reference:
        fds.FrameOfReferenceUID = ctx["for_uid"]
        fds.PositionReferenceIndicator = ""
    fds.InstanceCreationDate = ctx["date"]
    fds.InstanceCreationTime = ctx["time"]


def image_plane(fds: Dataset, grid: Grid) -> None:
    """ImageOrientationPatient / PixelSpacing / Rows / Columns from the (canonical) grid."""
    a_lps = LPS_FROM_RAS @ grid.affine
    sx, sy, sz = grid.spacing_mm
    row_dir = a_lps[:3, 0] / sx
    col_dir = a_lps[:3, 1] / sy
    fds.ImageOrientationPatient = ds(np.concatenate([row_dir, col_dir]))
    fds.PixelSpacing = ds([sy, sx])  # [between rows, between columns]
    fds.SliceThickness = ds(sz)
    fds.Rows = grid.shape[1]
    fds.Columns = grid.shape[0]
    fds.SamplesPerPixel = 1
    fds.PhotometricInterpretation = "MONOCHROME2"
