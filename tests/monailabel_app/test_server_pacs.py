"""A REAL MONAI Label server pointed at a REAL Orthanc (DICOMweb plugin, HTTP basic auth).

Orthanc runs on free ports with a temporary storage folder (orthanc_process.Orthanc); the sample
DICOM RT study `sample-data/dicom/pt_201` is uploaded over STOW-RS, plus a study holding only CT
slices. The server gets Orthanc's credentials through MONAI Label's own settings
(`MONAI_LABEL_DICOMWEB_USERNAME` / `_PASSWORD`). What the server stores is read back from Orthanc
with a separate DICOMweb client and checked against the server's answer.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from orthanc_process import Orthanc
from pydicom.uid import generate_uid
from server_process import start_server, stop_server
from test_server_integration import _multipart, _nifti

from diffkt3d.io.dicom import read_dicom_case

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample-data" / "dicom" / "pt_201"
USERS = {"diffkt3d": "pacs-secret"}
STEPS = 2


def _ct_only_study(datasets: list[pydicom.Dataset]) -> tuple[str, list[pydicom.Dataset]]:
    """Three CT slices of the sample under new study/series/instance UIDs: a study without RTSTRUCT."""
    study, series = generate_uid(), generate_uid()
    out = []
    for d in [d for d in datasets if d.Modality == "CT"][:3]:
        c = d.copy()
        c.StudyInstanceUID, c.SeriesInstanceUID = study, series
        c.SOPInstanceUID = c.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(c)
    return series, out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(root / "orthanc", users=USERS)
    try:
        sample = orthanc.upload_folder(SAMPLE)
        ct_only_series, ct_only = _ct_only_study(sample)
        orthanc.upload(ct_only)
        conf = {"model_dir": str(root / "model"), "state_dir": str(root / "state"), "device": "cpu"}
        env = {"MONAI_LABEL_DICOMWEB_USERNAME": "diffkt3d", "MONAI_LABEL_DICOMWEB_PASSWORD": USERS["diffkt3d"]}
        try:
            proc, url = start_server(root, orthanc.dicomweb, conf, env)  # type: ignore[arg-type]
        except RuntimeError as exc:
            pytest.fail(str(exc))
        by = {m: [d for d in sample if d.Modality == m] for m in ("CT", "RTSTRUCT", "RTPLAN", "RTDOSE")}
        yield {"url": url, "root": root, "orthanc": orthanc, "sample": by, "proc": proc,
               "ct": str(by["CT"][0].SeriesInstanceUID), "study": str(by["CT"][0].StudyInstanceUID),
               "ct_only": ct_only_series}
        stop_server(proc)
    finally:
        orthanc.stop()


def _infer(pacs, task: str, image: str, params: dict | None = None) -> requests.Response:
    return requests.post(f"{pacs['url']}/infer/{task}", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params or {})}, timeout=900)


def _series(pacs, modality: str) -> list[pydicom.Dataset]:
    client = pacs["orthanc"].client()
    return [pydicom.Dataset.from_json(s) for s in client.search_for_series(
        pacs["study"], search_filters={"Modality": modality}, fields=["SeriesDescription"])]


def _retrieve(pacs, series: str) -> list[pydicom.Dataset]:
    return pacs["orthanc"].client().retrieve_series(pacs["study"], series)


def test_orthanc_needs_credentials_and_the_server_lists_its_ct_series(pacs):
    assert requests.get(f"{pacs['orthanc'].dicomweb}/studies", timeout=10).status_code == 401
    info = requests.get(f"{pacs['url']}/info/", timeout=30).json()
    assert {"dose", "impute_ct", "impute_ptv", "impute_oar"} <= set(info["models"])
    listing = requests.get(f"{pacs['url']}/datastore/", params={"output": "all"}, timeout=60)
    assert listing.status_code == 200, listing.text
    assert set(listing.json()) == {pacs["ct"], pacs["ct_only"]}
    log = next(pacs["root"].glob("server-*.log")).read_text()
    assert "dcmqi" not in log.lower()  # MONAI Label's DICOMweb start-up downloads a converter; ours does not


def test_dose_is_stored_as_a_predicted_rtdose_and_reads_back(pacs, tmp_path):
    r = _infer(pacs, "dose", pacs["ct"], {"steps": STEPS, "seed": 1})
    assert r.status_code == 200, r.text
    answer, image = _multipart(r)
    dose = np.asarray(_nifti(image).get_fdata(dtype=np.float32))
    rs, rp = pacs["sample"]["RTSTRUCT"][0], pacs["sample"]["RTPLAN"][0]
    assert answer["case"]["dicom"] == {"study": pacs["study"], "ct_series": pacs["ct"],
                                       "rtstruct": rs.SOPInstanceUID, "rtplan": rp.SOPInstanceUID}
    inferred = " | ".join(answer["case"]["inferred"])
    assert "PTV70: target, prescription 70 Gy from RTPLAN" in inferred and f"RTPLAN {rp.SOPInstanceUID}" in inferred
    stored = answer["stored"]
    assert stored["status"] == "stored" and stored["modality"] == "RTDOSE" and stored["version"] == 1, stored
    [rd] = _retrieve(pacs, stored["series"])
    assert rd.Modality == "RTDOSE" and rd.SOPInstanceUID == stored["sop_instance"]
    assert rd.SeriesDescription.startswith("DiffKT3D predicted dose v1")
    assert rd.DoseComment == f"PREDICTED by DiffKT3D, model {answer['model_version']}"[:64]
    assert "not a planned or delivered dose" in rd.ImageComments and answer["model_version"] in rd.ImageComments
    assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    ct = pacs["sample"]["CT"][0]
    assert (rd.StudyInstanceUID, rd.FrameOfReferenceUID, rd.PatientID) == (ct.StudyInstanceUID,
                                                                           ct.FrameOfReferenceUID, ct.PatientID)
    assert "OperatorsName" in rd
    # read back through the project's reader: the RTDOSE from Orthanc on the CT from Orthanc
    folder = tmp_path / "back"
    folder.mkdir()
    for d in [*_retrieve(pacs, pacs["ct"]), rd]:
        d.save_as(str(folder / f"{d.SOPInstanceUID}.dcm"))
    back = read_dicom_case(folder, with_dose=True)
    assert back.dose_gy.shape == dose.shape
    assert np.abs(back.dose_gy - dose).max() <= float(rd.DoseGridScaling) / 2 + 1e-4


def test_repeats_do_not_pile_up_and_new_requests_are_versioned(pacs):
    first = _multipart(_infer(pacs, "dose", pacs["ct"], {"steps": STEPS, "seed": 1}))[0]["stored"]
    assert first["status"] == "already stored", first
    predicted = [s for s in _series(pacs, "RTDOSE") if s.SeriesDescription.startswith("DiffKT3D predicted")]
    assert [s.SeriesInstanceUID for s in predicted] == [first["series"]]
    other = _multipart(_infer(pacs, "dose", pacs["ct"], {"steps": STEPS, "seed": 2}))[0]["stored"]
    assert other["status"] == "stored" and other["version"] == 2 and other["earlier"] == [first["series"]]
    assert other["series"] != first["series"]
    assert len([s for s in _series(pacs, "RTDOSE") if s.SeriesDescription.startswith("DiffKT3D predicted")]) == 2
    preview = _multipart(_infer(pacs, "dose", pacs["ct"], {"preview": True}))[0]["stored"]
    assert preview["status"] == "not stored" and "preview" in preview["reason"]
    assert len([s for s in _series(pacs, "RTDOSE") if s.SeriesDescription.startswith("DiffKT3D predicted")]) == 2


def test_impute_oar_is_stored_as_rtstruct_and_not_used_as_input(pacs):
    r = _infer(pacs, "impute_oar", pacs["ct"], {"steps": STEPS})
    assert r.status_code == 200, r.text
    answer, _ = _multipart(r)
    stored = answer["stored"]
    assert stored["status"] == "stored" and stored["modality"] == "RTSTRUCT", stored
    [rs] = _retrieve(pacs, stored["series"])
    assert rs.SeriesDescription.startswith("DiffKT3D imputed OARs v1") and "OperatorsName" in rs
    assert {roi.ROIName for roi in rs.StructureSetROISequence} == set(answer["labels"])
    ct_uids = {d.SOPInstanceUID for d in pacs["sample"]["CT"]}
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for roi in rs.ROIContourSequence
            for c in roi.get("ContourSequence", [])}
    assert refs <= ct_uids
    assert bool(refs) == any(answer["voxels"].values()), answer["voxels"]
    # the clinical structure set stays the input of the next request; a job id (progress and cancel)
    # names the run, not the result: the same request with one is the same series
    again = _multipart(_infer(pacs, "impute_oar", pacs["ct"], {"steps": STEPS, "job_id": uuid.uuid4().hex}))[0]
    assert again["case"]["dicom"]["rtstruct"] == pacs["sample"]["RTSTRUCT"][0].SOPInstanceUID
    assert again["stored"]["status"] == "already stored"


def test_study_without_structures_unknown_series_and_bad_ids_are_4xx(pacs):
    r = _infer(pacs, "dose", pacs["ct_only"], {"steps": STEPS})
    assert r.status_code == 422 and "no RTSTRUCT that references CT series" in r.json()["detail"], r.text
    r = _infer(pacs, "dose", "1.2.3.4.5", {"steps": STEPS})
    assert r.status_code == 404 and "no CT series" in r.json()["detail"], r.text
    r = _infer(pacs, "dose", "../etc", {"steps": STEPS})
    assert r.status_code == 400, r.text
    assert requests.get(f"{pacs['url']}/info/", timeout=30).status_code == 200


def test_next_strategy_and_state_folder_over_the_pacs(pacs):
    r = _infer(pacs, "dose", pacs["ct"], {"steps": STEPS, "candidates": 2, "seed": 5})
    assert r.status_code == 200, r.text
    answer = _multipart(r)[0]
    nxt = requests.post(f"{pacs['url']}/activelearning/preference", json={"rater": "dr_x"}, timeout=60).json()
    assert nxt["id"] == pacs["ct"] and nxt["candidate_totals"] == [c["scorecard_total"] for c in answer["candidates"]]
    pref = {"case_id": pacs["ct"], "chosen_id": answer["candidates"][1]["id"], "rater": "dr_x",
            "candidates": [{"id": c["id"], "seed": c["seed"], "model_version": answer["model_version"]}
                           for c in answer["candidates"]]}
    r = requests.post(f"{pacs['url']}/diffkt3d/preferences", json=pref, timeout=30)
    assert r.status_code == 201, r.text
    state = pacs["root"] / "state"
    assert (state / "preferences" / "preferences.jsonl").read_text().count(pacs["ct"]) == 1
    assert (state / "info" / f"{pacs['ct']}.json").is_file()
    # dr_x labelled the sample: next is the other CT series (never scored)
    nxt = requests.post(f"{pacs['url']}/activelearning/preference", json={"rater": "dr_x"}, timeout=60).json()
    assert nxt["id"] == pacs["ct_only"]
    # nothing of the server's state went to the PACS: only the study's series and DiffKT3D's results
    modalities = {m: len(_series(pacs, m)) for m in ("CT", "RTSTRUCT", "RTPLAN")}
    assert modalities == {"CT": 1, "RTSTRUCT": 2, "RTPLAN": 1}
    shutil.rmtree(state / "dicomweb-cache")  # the cache is only a cache: the next request fetches again
    assert _infer(pacs, "dose", pacs["ct"], {"steps": STEPS, "seed": 1}).status_code == 200
