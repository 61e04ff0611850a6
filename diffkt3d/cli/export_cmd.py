"""`diffkt3d export dicom CASE... --out ROOT`: case folders -> one DICOM RT folder per case.

Each case folder (shared/docs/INTERFACES.md) becomes ROOT/<case id>/ with CT_0001.dcm...,
RS.dcm (structures and body), RP.dcm (beam geometry, when known) and RD.dcm (dose, when present).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffkt3d.errors import ConfigError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.dicom_write import write_dicom_case

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export case folders to other formats (DICOM RT)",
                                   description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True)
    dicom = formats.add_parser("dicom", help="write CT series + RTSTRUCT + RTPLAN + RTDOSE per case")
    dicom.add_argument("cases", nargs="+", type=Path, metavar="CASE", help="case folder(s)")
    dicom.add_argument("--out", required=True, type=Path, metavar="ROOT",
                       help="output root; each case goes to ROOT/<case id>/")
    dicom.add_argument("--patient-id", default="{case}",
                       help="DICOM PatientID; '{case}' is replaced by the case id (default: the case id)")
    dicom.add_argument("--patient-name", default="DiffKT3D^{case}",
                       help="DICOM PatientName, '{case}' replaced (default: DiffKT3D^<case id>)")
    dicom.add_argument("--dose-bits", type=int, choices=(16, 32), default=16,
                       help="bits per RTDOSE voxel (16: <= 1.2 mGy rounding at 80 Gy; 32: smaller "
                            "error, twice the size)")
    dicom.add_argument("--no-dose", action="store_true", help="do not write RTDOSE even if dose exists")
    dicom.add_argument("--overwrite", action="store_true",
                       help="replace .dcm files in an existing ROOT/<case id>/ folder")
    dicom.add_argument("--uid-seed", default=None,
                       help="derive UIDs deterministically from this text + case id (reproducible "
                            "exports, e.g. sample data); default: random UIDs")
    dicom.set_defaults(func=run_dicom)


def _fill(template: str, case_id: str, option: str) -> str:
    if "{" in template.replace("{case}", ""):
        raise ConfigError(f"{option} {template!r}: only the placeholder {{case}} is allowed")
    return template.replace("{case}", case_id)


def run_dicom(args: argparse.Namespace) -> int:
    """Export every case; the first bad case stops the run with its CaseError (exit 2)."""
    names = [p.name for p in args.cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"several CASE folders share the name {duplicates[0]!r}; output folders "
                          "are named by case id")
    for folder in args.cases:
        case = load_case_folder(folder, with_dose=not args.no_dose)
        out_dir = args.out / case.case_id
        seed = None if args.uid_seed is None else f"{args.uid_seed}/{case.case_id}"
        written = write_dicom_case(case, out_dir,
                                   patient_id=_fill(args.patient_id, case.case_id, "--patient-id"),
                                   patient_name=_fill(args.patient_name, case.case_id, "--patient-name"),
                                   dose_bits=args.dose_bits, overwrite=args.overwrite, uid_seed=seed)
        size_mb = sum(p.stat().st_size for paths in written.values() for p in paths) / 1e6
        print(f"{case.case_id}: {len(written['CT'])} CT slices, {len(case.structures)} structures"
              f"{' + body' if case.body is not None else ''}"
              f"{', RTPLAN' if written['RTPLAN'] else ''}{', RTDOSE' if written['RTDOSE'] else ''}"
              f" -> {out_dir} ({size_mb:.1f} MB)")
    return 0
