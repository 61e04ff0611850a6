"""`diffkt3d impute --target ct --ct-backbone prdit`: the PRDiT CT path of the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from diffkt3d.cli.main import main


def test_prdit_backbone_writes_ct_on_the_case_grid(tmp_path, synthetic_case_dir, tiny_prdit_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "ct", "--out", str(out), "--steps", "2",
               "--ct-backbone", "prdit", "--prdit-model", str(tiny_prdit_checkpoint), "--prdit-k", "1.5"])
    assert rc == 0, capsys.readouterr().err
    case_out = next(out.iterdir())
    ct = nib.load(str(case_out / "ct.nii.gz"))
    ref = nib.load(str(synthetic_case_dir / "ct.nii.gz"))
    assert ct.shape == ref.shape and np.allclose(ct.affine, ref.affine)
    report = json.loads((case_out / "impute_ct.json").read_text())
    assert report["model_version"].startswith("prdit:tiny-prdit@") and report["steps"] == 2
    # no benchmark recorded with the tiny model: the gate calls the CT experimental, on stderr too
    assert report["quality"]["status"] == "experimental"
    assert report["warnings"] == [f"ct imputation is experimental: {report['quality']['reason']}"]
    assert "WARNING: ct imputation is experimental" in capsys.readouterr().err


def test_oar_imputation_reports_empty_masks(tmp_path, synthetic_case_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "oar", "--out", str(out), "--steps", "1",
               "--model", str(tiny_checkpoint)])
    assert rc == 0, capsys.readouterr().err
    case_out = next(out.iterdir())
    report = json.loads((case_out / "impute_oar.json").read_text())
    empty = sorted(f.name.split(".")[0] for f in case_out.glob("*.nii.gz")
                   if not np.asarray(nib.load(str(f)).dataobj).any())
    assert sorted(w.split(":")[0] for w in report["warnings"][1:]) == empty
    err = capsys.readouterr().err
    assert err.count("WARNING:") == len(report["warnings"])


def test_prdit_backbone_errors_are_one_line_exit_2(tmp_path, synthetic_case_dir, tiny_prdit_checkpoint, capsys):
    base = ["impute", str(synthetic_case_dir), "--out", str(tmp_path / "o"), "--ct-backbone", "prdit"]
    assert main([*base, "--target", "ct"]) == 2
    assert "needs a PRDiT checkpoint" in capsys.readouterr().err
    assert main([*base, "--target", "ct", "--prdit-model", str(tmp_path / "missing.pt")]) == 2
    assert "PRDiT checkpoint not found" in capsys.readouterr().err
    assert main([*base, "--target", "oar", "--prdit-model", str(tiny_prdit_checkpoint)]) == 2
    assert "imputes CT only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_write_case_then_export_dicom_marks_imputed_rois(tmp_path, openkbp_root, capsys):
    """impute --write-case -> export dicom on a real OpenKBP case with the shipped model (1 step):
    the RTSTRUCT's imputed ROIs carry their names, interpreted type and 'IMPUTED' generation, and read
    back (pydicom, read_dicom_case, import dicom) as the imputed masks."""
    import pydicom

    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.io.dicom import read_dicom_case

    source = openkbp_root / "validation" / "pt_201"
    out, dicom, back = tmp_path / "imputed", tmp_path / "dicom", tmp_path / "back"
    rc = main(["impute", str(source), "--target", "ptv", "--out", str(out), "--steps", "1", "--write-case"])
    assert rc == 0, capsys.readouterr().err
    case_dir = out / "pt_201"
    report = json.loads((case_dir / "impute_ptv.json").read_text())
    version = report["model_version"]
    imputed = report["added"] + report["replaced"]
    assert imputed, "the shipped model imputed no PTV with voxels"
    assert sorted(imputed + report["empty"]) == ["PTV56", "PTV63", "PTV70"]
    assert report["input_kept"] == [n for n in report["empty"] if (source / f"{n}.nii.gz").exists()]
    plan = json.loads((case_dir / "plan.json").read_text())["structures"]
    for name in imputed:
        assert plan[name] == {"role": "target", "prescription_gy": float(name[3:]), "imputed_by": version}
    assert "imputed_by" not in plan["Brainstem"] and plan["Brainstem"]["role"] == "oar"
    case = load_case_folder(case_dir)  # the written folder is a case; everything else came from the input
    original = load_case_folder(source)
    assert np.array_equal(case.ct_hu, original.ct_hu) and np.array_equal(case.body, original.body)
    for name in set(original.structures) - set(imputed):
        assert np.array_equal(case.structures[name].mask, original.structures[name].mask), name
        assert case.structures[name].imputed_by is None

    assert main(["export", "dicom", str(case_dir), "--out", str(dicom), "--no-dose"]) == 0
    rs = pydicom.dcmread(str(dicom / "pt_201" / "RS.dcm"))
    rois = {r.ROIName: r for r in rs.StructureSetROISequence}
    types = {r.ReferencedROINumber: r.RTROIInterpretedType for r in rs.RTROIObservationsSequence}
    for name in imputed:
        assert rois[name].ROIGenerationAlgorithm == "AUTOMATIC"
        assert rois[name].ROIGenerationDescription == f"IMPUTED by DiffKT3D, model {version}"
        assert types[rois[name].ROINumber] == "PTV"
        assert name in rs.StructureSetDescription and "IMPUTED" in rs.StructureSetDescription
    assert types[rois["Brainstem"].ROINumber] == "ORGAN" and "ROIGenerationDescription" not in rois["Brainstem"]
    assert rois["Brainstem"].ROIGenerationAlgorithm == ""  # a contour that came with the case: origin unknown

    read = read_dicom_case(dicom / "pt_201", with_dose=False)
    for name in imputed:
        s, ref = read.structures[name], case.structures[name].mask
        dice = 2 * (s.mask & ref).sum() / (s.mask.sum() + ref.sum())
        assert dice > 0.995, (name, dice)
        assert (s.role, s.prescription_gy, s.imputed_by) == ("target", float(name[3:]), version)
    assert read.structures["Brainstem"].imputed_by is None
    assert main(["import", "dicom", str(dicom / "pt_201"), "--out", str(back)]) == 0
    reimported = json.loads((back / "pt_201" / "plan.json").read_text())["structures"]
    assert {n for n, s in reimported.items() if s.get("imputed_by") == version} == set(imputed)


def test_write_case_refusals_keep_the_input_case(tmp_path, synthetic_case_dir, tiny_checkpoint, capsys):
    before = {p.name: p.read_bytes() for p in synthetic_case_dir.iterdir()}
    base = ["impute", str(synthetic_case_dir), "--steps", "1", "--model", str(tiny_checkpoint)]
    assert main([*base, "--target", "ct", "--out", str(tmp_path / "o"), "--write-case"]) == 2
    assert "--write-case writes imputed structures" in capsys.readouterr().err
    # ROOT/<case> would be the input folder itself: refused, with or without --write-case
    for extra in ([], ["--write-case"]):
        assert main([*base, "--target", "oar", "--out", str(synthetic_case_dir.parent), *extra]) == 2
        assert "would write into the input case folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in synthetic_case_dir.iterdir()} == before
    assert not (tmp_path / "o").exists()


def test_structures_selects_the_masks_written(tmp_path, synthetic_case_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "oar", "--out", str(out), "--steps", "1",
               "--model", str(tiny_checkpoint), "--structures", "SpinalCord", "Brainstem"])
    assert rc == 0, capsys.readouterr().err
    case_out = next(out.iterdir())
    assert sorted(f.name for f in case_out.glob("*.nii.gz")) == ["Brainstem.nii.gz", "SpinalCord.nii.gz"]
    assert json.loads((case_out / "impute_oar.json").read_text())["files"] == ["SpinalCord.nii.gz", "Brainstem.nii.gz"]


def test_an_unknown_structure_is_refused_naming_the_known_ones(tmp_path, synthetic_case_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "oar", "--out", str(out), "--steps", "1",
               "--model", str(tiny_checkpoint), "--structures", "Heart"])
    err = capsys.readouterr().err
    assert rc == 2 and "--structures: cannot impute oar structure(s) ['Heart']" in err and "SpinalCord" in err
    assert "Traceback" not in err and not out.exists()
    rc = main(["impute", str(synthetic_case_dir), "--target", "ct", "--out", str(out), "--steps", "1",
               "--model", str(tiny_checkpoint), "--structures", "Heart"])
    assert rc == 2 and "a CT imputation has none" in capsys.readouterr().err
