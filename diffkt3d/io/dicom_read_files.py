"""One DICOM file of a case folder: parsing, and reading its attributes with errors that name it.

Every reader (CT series, RTSTRUCT, RTPLAN, RTDOSE) goes through these helpers so that a missing,
ill-typed or truncated value deep in an RT object surfaces as a `CaseError` naming the case and the
file, never as a pydicom traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from diffkt3d.errors import CaseError

log = logging.getLogger(__name__)

_SKIPPED_SOP_CLASSES = {"1.2.840.10008.1.3.10"}  # Media Storage Directory (DICOMDIR)


@dataclass
class DicomFile:
    """A parsed file and where it came from (for error messages)."""

    path: Path
    ds: Dataset


@contextmanager
def malformed(f: DicomFile, case_id: str, what: str) -> Iterator[None]:
    """Turn a missing/ill-typed attribute deep in an RT object into a CaseError naming the file."""
    try:
        yield
    except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CaseError(f"malformed {what} ({type(exc).__name__}: {exc})", case=case_id,
                        file=str(f.path)) from None


def read_dicom_file(path: Path, case_id: str) -> Dataset | None:
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


def dicom_pixels(f: DicomFile, case_id: str) -> np.ndarray:
    """pixel_array with truncation / missing-data errors turned into CaseError."""
    if "PixelData" not in f.ds:
        raise CaseError(f"{f.ds.Modality} file has no pixel data", case=case_id, file=str(f.path))
    try:
        return np.asarray(f.ds.pixel_array)
    except Exception as exc:  # pydicom raises ValueError/NotImplementedError/RuntimeError here
        raise CaseError(f"cannot decode pixel data (truncated file or unsupported transfer syntax: "
                        f"{exc})", case=case_id, file=str(f.path)) from None


def dicom_floats(f: DicomFile, keyword: str, n: int, case_id: str) -> np.ndarray:
    value = f.ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if value is None or arr.size != n:
        raise CaseError(f"{keyword} must hold {n} numbers, found {value!r}", case=case_id, file=str(f.path))
    return arr
