"""`diffkt3d export dicom|cases CASE... --out ROOT [--anonymise]`: case folders -> DICOM RT, or
copies of the case folders (e.g. a training set to hand on).

dicom: each case folder (docs/case-format.md) becomes ROOT/<case id>/ with CT_0001.dcm...,
RS.dcm (structures and body), RP.dcm (beam geometry, when known) and RD.dcm (dose, when present).
cases: ROOT/<case id>/ gets the case's NIfTI files and plan.json (nothing else).

--anonymise replaces each case id by a keyed pseudonym (diffkt3d/io/anonymise.py) in folder
names, DICOM patient tags and descriptions, and blanks the free-text fields of NIfTI headers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib

from diffkt3d.constants import PLAN_FILE
from diffkt3d.errors import CaseError, ConfigError
from diffkt3d.io.anonymise import anonymised, new_key, pseudonym
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
    _anonymise_options(dicom)
    dicom.set_defaults(func=run_dicom)
    cases = formats.add_parser("cases", help="copy case folders (NIfTI + plan.json), e.g. a training set")
    cases.add_argument("cases", nargs="+", type=Path, metavar="CASE", help="case folder(s)")
    cases.add_argument("--out", required=True, type=Path, metavar="ROOT",
                       help="output root; each case goes to ROOT/<case id>/ (must not exist yet)")
    _anonymise_options(cases)
    cases.set_defaults(func=run_cases)


def _anonymise_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--anonymise", action="store_true",
                        help="replace case ids by keyed pseudonyms (anon-<12 hex>) in folder names and "
                             "DICOM patient tags; blank NIfTI header text fields")
    parser.add_argument("--anonymise-key", default=None, metavar="KEY",
                        help="key of the pseudonyms (default: $DIFFKT3D_ANONYMISE_KEY, else a random key "
                             "that is not stored, so the export cannot be re-linked)")


def _key(args: argparse.Namespace) -> str | None:
    if not args.anonymise:
        if args.anonymise_key:
            raise ConfigError("--anonymise-key is given without --anonymise")
        return None
    return args.anonymise_key or os.environ.get("DIFFKT3D_ANONYMISE_KEY") or new_key()


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
    key = _key(args)
    if key is not None:
        if (args.patient_id, args.patient_name) != ("{case}", "DiffKT3D^{case}"):
            raise ConfigError("--anonymise writes the pseudonym as PatientID and PatientName; drop "
                              "--patient-id / --patient-name")
        args.patient_name = "ANON^{case}"
    for folder in args.cases:
        case = load_case_folder(folder, with_dose=not args.no_dose)
        if key is not None:
            case = anonymised(case, key)
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


def run_cases(args: argparse.Namespace) -> int:
    """Copy each case folder's NIfTI files and plan.json; with --anonymise under its pseudonym and
    with NIfTI header text (descrip, aux_file, intent_name, db_name) blanked."""
    key = _key(args)
    for folder in args.cases:
        load_case_folder(folder)  # a broken case stops the export before anything is written for it
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) or p.name == PLAN_FILE)
        name = folder.name if key is None else pseudonym(folder.name, key)
        out_dir = args.out / name
        if out_dir.exists():
            raise CaseError("output folder already exists; choose a new ROOT", case=name, file=str(out_dir))
        out_dir.mkdir(parents=True)
        for src in files:
            if key is not None and src.name != PLAN_FILE:
                _write_scrubbed_nifti(src, out_dir / src.name)
            else:
                shutil.copy2(src, out_dir / src.name)
        print(f"{name}: {len(files)} files -> {out_dir}")
    return 0


def _write_scrubbed_nifti(src: Path, dst: Path) -> None:
    """Same voxels, affine and data type; the header's free-text fields and extensions emptied."""
    img = nib.load(str(src))
    header = img.header.copy()
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        if field in header:
            header[field] = b""
    del header.extensions[:]  # extensions can carry whole DICOM headers (dcm2niix -e, afni)
    out = nib.Nifti1Image(img.dataobj, img.affine, header)
    nib.save(out, str(dst))

