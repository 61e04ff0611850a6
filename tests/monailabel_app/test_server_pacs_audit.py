"""PACS writes in the audit trail: a REAL server with authentication ON (local OpenID Connect
provider), a REAL Orthanc holding the sample DICOM RT study, a random tiny model.

What the server stores in the PACS (RTSTRUCT of an imputation, RTDOSE of a prediction) is audited
as `pacs.store` under the user whose request caused it: the write-ahead journal holds the attempt
before the STOW-RS request, the trail the outcome with the series / SOP instance UIDs the answer
names, read back through the admin's GET /diffkt3d/audit. Repeats that store nothing add nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from oidc_provider import CLIENT_ID, LocalOIDCProvider
from orthanc_process import Orthanc
from server_process import start_server, stop_server
from test_server_integration import _multipart
from tiny_model import write_tiny_checkpoint

pytestmark = pytest.mark.server

SAMPLE = Path(__file__).resolve().parents[2] / "sample-data" / "dicom" / "pt_201"
PACS_USERS = {"diffkt3d": "pacs-secret"}
USERS = {"dr.smith": ("pw-smith", ["diffkt3d-clinician"]),
         "phys.jones": ("pw-jones", ["diffkt3d-physicist"]),
         "root.admin": ("pw-admin", ["diffkt3d-admin"])}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("pacs-audit")
    idp = LocalOIDCProvider(USERS).start()
    orthanc = Orthanc(root / "orthanc", users=PACS_USERS)
    try:
        sample = orthanc.upload_folder(SAMPLE)
        conf = {"model_dir": str(root / "model"), "state_dir": str(root / "state"), "device": "cpu",
                "model": str(write_tiny_checkpoint(root / "tiny.pt", grid=16))}
        env = {"MONAI_LABEL_DICOMWEB_USERNAME": "diffkt3d", "MONAI_LABEL_DICOMWEB_PASSWORD": PACS_USERS["diffkt3d"],
               "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
               "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID}
        try:
            proc, url = start_server(root, orthanc.dicomweb, conf, env)  # type: ignore[arg-type]
        except RuntimeError as exc:
            pytest.fail(str(exc))
        ct = next(d for d in sample if d.Modality == "CT")
        yield {"url": url, "root": root, "idp": idp, "ct": str(ct.SeriesInstanceUID),
               "study": str(ct.StudyInstanceUID)}
        stop_server(proc)
    finally:
        orthanc.stop()
        idp.stop()


def _h(pacs, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {pacs['idp'].issue(user, USERS[user][1])}"}


def _infer(pacs, user: str, task: str, params: dict) -> dict:
    r = requests.post(f"{pacs['url']}/infer/{task}", params={"image": pacs["ct"], "output": "all"},
                      data={"params": json.dumps(params)}, headers=_h(pacs, user), timeout=900)
    assert r.status_code == 200, r.text
    return _multipart(r)[0]


def _stores(pacs) -> list[dict]:
    r = requests.get(f"{pacs['url']}/diffkt3d/audit", params={"action": "pacs.store"},
                     headers=_h(pacs, "root.admin"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


def _journal(pacs) -> list[dict]:
    path = pacs["root"] / "state" / "audit" / "journal" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pacs_writes_are_audited_under_the_requesting_user(pacs):
    oar = _infer(pacs, "dr.smith", "impute_oar", {"steps": 1})
    stored = oar["stored"]
    assert stored["status"] == "stored" and stored["modality"] == "RTSTRUCT", stored
    [entry] = _stores(pacs)
    assert (entry["user"], entry["roles"], entry["status"]) == ("dr.smith", ["clinician"], 201)
    assert (entry["method"], entry["path"]) == ("POST", "/infer/impute_oar")
    d = entry["details"]
    assert (d["study"], d["series"], d["sop_instance"]) == (pacs["study"], stored["series"], stored["sop_instance"])
    assert (d["modality"], d["task"], d["case_id"]) == ("RTSTRUCT", "impute_oar", pacs["ct"])
    assert d["model_version"] == oar["model_version"] and d["model_version"] in d["series_description"]
    # write-ahead: the attempt was journalled before the STOW-RS request, under the same request id
    before = [j for j in _journal(pacs) if j["action"] == "pacs.store"]
    assert [(j["user"], j["status"], j["details"]["stage"], j["details"]["series"]) for j in before] == \
        [("dr.smith", 0, "before", stored["series"])]
    assert before[0]["details"]["request"] == d["request"]

    dose = _infer(pacs, "phys.jones", "dose", {"steps": 1, "seed": 3})
    assert dose["stored"]["status"] == "stored", dose["stored"]
    entries = _stores(pacs)
    assert [(e["user"], e["details"]["modality"], e["details"]["series"]) for e in entries] == [
        ("dr.smith", "RTSTRUCT", stored["series"]), ("phys.jones", "RTDOSE", dose["stored"]["series"])]

    again = _infer(pacs, "dr.smith", "impute_oar", {"steps": 1})  # the same result: nothing is written
    assert again["stored"]["status"] == "already stored"
    assert len(_stores(pacs)) == 2
