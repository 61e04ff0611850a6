"""DICOM RT import/export: `read_dicom_case(folder) -> Case`, `write_dicom_case(case, out_dir)`.

The implementation is split for reading top to bottom: `dicom_read` (folder scan, CT series,
assembly of the Case) over `dicom_read_files` (one file, errors naming it) and `dicom_read_rt`
(RTSTRUCT rasterisation, RTPLAN beams, RTDOSE resampling); `dicom_write` (CT series, the export)
over `dicom_write_modules` (header and modules every file shares) and `dicom_write_rt` (RTSTRUCT,
RTPLAN, RTDOSE on the CT grid); `dicom_common` (SOP classes and the LPS <-> RAS convention,
documented there).
"""

from __future__ import annotations

from diffkt3d.io.dicom_read import read_dicom_case
from diffkt3d.io.dicom_write import write_dicom_case

__all__ = ["read_dicom_case", "write_dicom_case"]
