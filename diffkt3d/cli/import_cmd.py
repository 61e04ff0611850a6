"""`diffkt3d import openkbp|gdp-hmm|dicom SRC... --out ROOT`: other formats -> case folders.

Every imported case becomes ROOT/<case id>/ in the case-folder layout (docs/case-format.md:
one NIfTI per modality / structure plus plan.json with roles, prescriptions and beams). An
existing ROOT/<case id>/ is never overwritten unless --overwrite is given; the check runs for all
cases before anything is written, so a refused run writes nothing.

- openkbp: SRC is an OpenKBP CSV case folder (pt_N with voxel_dimensions.csv) or a folder
  holding such folders (e.g. provided-data/validation-pats).
- gdp-hmm: SRC is an .npz file or a folder of them; --ptv-dict PTV_DICT.json supplies the
  prescriptions. The npz is unpickled: only import files you trust.
- dicom: SRC is one patient's DICOM RT folder (CT series, RTSTRUCT, RTPLAN, RTDOSE).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from diffkt3d.data.case import Case
from diffkt3d.errors import CaseError, ConfigError
from diffkt3d.io.case_folder import save_case_folder

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="convert OpenKBP CSV, GDP-HMM npz or DICOM RT to case folders",
                                   description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, type=Path, metavar="ROOT",
                       help="output root; each case goes to ROOT/<case id>/")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing ROOT/<case id>/ folder (default: refuse)")
        p.add_argument("--no-dose", action="store_true", help="do not import the dose")
        p.add_argument("--plates", action="store_true",
                       help="also rasterise beam_plate.nii.gz / angle_plate.nii.gz when the source has none")

    openkbp = formats.add_parser("openkbp", help="OpenKBP sparse-CSV case folders")
    openkbp.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                         help="a pt_N folder or a folder of them")
    common(openkbp)
    openkbp.set_defaults(func=run_import)

    gdp = formats.add_parser("gdp-hmm", help="GDP-HMM npz files (trusted files only: they are unpickled)")
    gdp.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="an .npz file or a folder of them")
    gdp.add_argument("--ptv-dict", type=Path, default=None, metavar="JSON",
                     help="PTV_DICT.json with PTV_High/Mid/Low -> OPTName, PDose per patient "
                          "(default: prescriptions inferred from structure names)")
    common(gdp)
    gdp.set_defaults(func=run_import)

    dicom = formats.add_parser("dicom", help="DICOM RT patient folders (CT + RTSTRUCT [+ RTPLAN, RTDOSE])")
    dicom.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="one folder per patient")
    common(dicom)
    dicom.set_defaults(func=run_import)


def _expand(fmt: str, sources: list[Path]) -> list[Path]:
    """Source paths -> one path per case."""
    out: list[Path] = []
    for src in sources:
        if not src.exists():
            raise CaseError("source does not exist", file=str(src))
        if fmt == "openkbp":
            from diffkt3d.io.openkbp_csv import find_openkbp_csv_cases

            out.extend(find_openkbp_csv_cases(src))
        elif fmt == "gdp-hmm":
            if src.is_dir():
                found = sorted(src.glob("*.npz"))
                if not found:
                    raise CaseError("no .npz files in the folder", file=str(src))
                out.extend(found)
            else:
                out.append(src)
        else:
            if not src.is_dir():
                raise CaseError("expected a DICOM folder (one patient)", file=str(src))
            out.append(src)
    return out


def _case_id(fmt: str, path: Path) -> str:
    return path.name.removesuffix(".npz") if fmt == "gdp-hmm" else path.name


def _reader(fmt: str, args: argparse.Namespace) -> Callable[[Path], Case]:
    with_dose = not args.no_dose
    if fmt == "openkbp":
        from diffkt3d.io.openkbp_csv import read_openkbp_csv_case

        return lambda p: read_openkbp_csv_case(p, with_dose=with_dose)
    if fmt == "gdp-hmm":
        from diffkt3d.io.gdp_hmm import load_ptv_dict, read_gdp_hmm

        table = load_ptv_dict(args.ptv_dict) if args.ptv_dict is not None else None
        return lambda p: read_gdp_hmm(p, table, with_dose=with_dose)
    try:  # written in parallel by the DICOM engineer; imported lazily so the other formats never need it
        from diffkt3d.io.dicom import read_dicom_case
    except ImportError as exc:
        raise ConfigError(f"DICOM import is not available in this installation ({exc})") from None
    return lambda p: read_dicom_case(p, with_dose=with_dose)


def _plan(fmt: str, args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    paths = _expand(fmt, args.sources)
    ids = [_case_id(fmt, p) for p in paths]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"several sources give the case id {duplicates[0]!r}; output folders are named by case id")
    targets = [args.out / i for i in ids]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise CaseError(f"{len(existing)} output case folder(s) already exist (first: {existing[0]}); "
                        "use --overwrite to replace them", file=str(existing[0]))
    return zip(paths, targets, strict=True)


def run_import(args: argparse.Namespace) -> int:
    """Import every source; the first bad case stops the run with its CaseError (exit 2)."""
    fmt = args.format
    jobs = list(_plan(fmt, args))
    read = _reader(fmt, args)
    for src, dst in jobs:
        case = read(src)
        if args.plates and (case.beam_plate is None or case.angle_plate is None):
            from diffkt3d.data.plates import ensure_plates

            ensure_plates(case)
        tmp = dst.with_name(dst.name + ".importing")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_case_folder(case, tmp)
        if dst.exists():
            shutil.rmtree(dst)  # only reachable with --overwrite (checked in _plan)
        tmp.rename(dst)
        extras = [m for m, ok in (("CT", case.ct_hu is not None), ("dose", case.dose_gy is not None),
                                  ("body", case.body is not None), ("plates", case.beam_plate is not None)) if ok]
        print(f"{case.case_id}: {len(case.structures)} structures, {', '.join(extras) or 'no volumes'} -> {dst}")
        if case.plan.inferred:
            log.info("%s: inferred: %s", case.case_id, "; ".join(case.plan.inferred))
    print(f"imported {len(jobs)} case(s) into {args.out}")
    return 0
