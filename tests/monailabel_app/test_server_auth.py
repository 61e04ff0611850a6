"""A REAL MONAI Label server with authentication ON, against a real (local) OpenID Connect provider.

The provider (oidc_provider.py) serves RS256 keys, discovery, JWKS and a password grant like a
Keycloak realm; the server is started with `MONAI_LABEL_AUTH_ENABLE=true` and its realm URI, as a
clinic would. Covers: 401/403/expired, forged rater, audit trail, no patient
names in the log or error messages, path traversal, upload limit. Model: a random `tiny`
checkpoint (dose values are meaningless here, only access matters).
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import requests
from oidc_provider import CLIENT_ID, LocalOIDCProvider, new_key
from server_process import start_server, stop_server
from tiny_model import write_tiny_checkpoint

pytestmark = pytest.mark.server

VALIDATION = Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation"
CASE = "pt_201"
MAX_UPLOAD_MB = 5
USERS = {"dr.smith": ("pw-smith", ["diffkt3d-clinician", "offline_access"]),
         "phys.jones": ("pw-jones", ["diffkt3d-physicist"]),
         "root.admin": ("pw-admin", ["diffkt3d-admin"]),
         "visitor": ("pw-visitor", ["offline_access"])}
# A patient identity that must never show up in the server's log or error messages.
PATIENT_NAME, PATIENT_ID = "Doe^Janet", "PHI-470815"
PHI_STRINGS = ("Doe", "Janet", "PHI-470815", "470815")


@pytest.fixture(scope="module")
def idp():
    provider = LocalOIDCProvider(USERS).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, idp):
    if not (VALIDATION / CASE).is_dir():
        pytest.skip("OpenKBP validation case not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("auth-server")
    studies = root / "studies"
    shutil.copytree(VALIDATION / CASE, studies / CASE)
    conf = {"max_upload_mb": str(MAX_UPLOAD_MB), "model_dir": str(root / "model"), "state_dir": str(root / "state"),
            "device": "cpu", "model": str(write_tiny_checkpoint(root / "tiny.pt", grid=16))}
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
           "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID}
    try:
        proc, url = start_server(root, studies, conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    log_path = root / f"server-{url.rsplit(':', 1)[1]}.log"
    yield {"url": url, "root": root, "studies": studies, "proc": proc, "log": log_path}
    stop_server(proc)


def _token(idp, user: str) -> str:
    return idp.issue(user, USERS[user][1])


def _h(idp, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(idp, user)}"}


def _record(rater: str = "dr.smith", case_id: str = CASE) -> dict:
    # external: these candidates were not served by this server (provenance is test_hostile_requests')
    return {"case_id": case_id, "chosen_id": "c0", "rater": rater, "external": True,
            "candidates": [{"id": "c0", "seed": 0, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}]}


def _audit(server, idp) -> list[dict]:
    r = requests.get(f"{server['url']}/diffkt3d/audit", headers=_h(idp, "root.admin"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


# -- 1. login and tokens ------------------------------------------------------------------------------
def test_login_through_the_server_gives_a_working_token(server, idp):
    r = requests.get(f"{server['url']}/auth/", timeout=30)  # public: clients ask whether to log in
    assert r.status_code == 200 and r.json()["enabled"] is True
    r = requests.post(f"{server['url']}/auth/token", data={"username": "dr.smith", "password": "pw-smith"}, timeout=30)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    info = requests.get(f"{server['url']}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert info.status_code == 200 and info.json()["diffkt3d"]["auth"] is True
    r = requests.post(f"{server['url']}/auth/token", data={"username": "dr.smith", "password": "wrong"}, timeout=30)
    assert r.status_code == 401 and "login failed" in r.json()["detail"]


# -- 2. reads need a valid token; 401 vs 403 ----------------------------------------------------------
def test_reads_need_a_valid_unexpired_token_from_the_provider(server, idp):
    url = f"{server['url']}/info/"
    r = requests.get(url, timeout=30)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert "not authenticated" in r.json()["detail"]
    bad = {"garbage": "not-a-jwt",
           "foreign key": idp.issue("dr.smith", USERS["dr.smith"][1], key=new_key()),
           "wrong issuer": idp.issue("dr.smith", USERS["dr.smith"][1], issuer="http://evil.example/realms/x"),
           "expired": idp.issue("dr.smith", USERS["dr.smith"][1], expires_in_s=-120)}
    for what, token in bad.items():
        r = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 401, (what, r.status_code, r.text)
    r = requests.get(url, headers={"Authorization": f"Bearer {bad['expired']}"}, timeout=30)
    assert "expired" in r.json()["detail"]
    # a valid token without any DiffKT3D role: known user, not allowed
    r = requests.get(url, headers=_h(idp, "visitor"), timeout=30)
    assert r.status_code == 403 and "visitor" in r.json()["detail"]
    for user in ("dr.smith", "phys.jones", "root.admin"):
        assert requests.get(url, headers=_h(idp, user), timeout=30).status_code == 200


def test_infer_needs_a_token_and_a_clinician_may_infer(server, idp):
    url = f"{server['url']}/infer/dose"
    params = {"image": CASE, "output": "json"}
    data = {"params": json.dumps({"preview": True, "candidates": 1})}
    assert requests.post(url, params=params, data=data, timeout=60).status_code == 401
    r = requests.post(url, params=params, data=data, headers=_h(idp, "dr.smith"), timeout=600)
    assert r.status_code == 200, r.text[:500]


# Every write or privileged route of the running app (MONAI Label 0.8.5's endpoints plus ours, as in
# monailabel_app/auth.py POLICY), who may call it and what an allowed user gets.
CLIN, PHYS, ADMIN = "dr.smith", "phys.jones", "root.admin"
EVERYONE, DATA_ROLES = {CLIN, PHYS, ADMIN}, {PHYS, ADMIN}


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _privileged_routes(server, idp) -> list[tuple[str, object, set[str], set[int] | None]]:
    """(method, request(user) -> (path, request kwargs), users allowed, statuses an allowed user gets).

    `request(None)` is the probe sent without a token, with an expired token and with wrong roles.
    Statuses None: the request would start real work (a training run of every trainer, a WSI or
    DICOMweb proxy call, nvidia-smi), so allowed users are not sent it; `POST /train/any2any`
    succeeding for a physicist is `test_training_runs_models_and_refusals_are_audited...` below.
    Sessions (`PUT /session/`, `DELETE /session/<id>`) and `POST /activelearning/*` are open to
    clinicians BY DESIGN (auth.POLICY, docs/security.md section 4): a session is the viewer's own
    upload of the case it has loaded, used only for inference, never stored in the datastore or
    trained on, and it expires; the strategy only picks which case to show next.
    """
    ct = (VALIDATION / CASE / "ct.nii.gz").read_bytes()
    label = ("label.nii.gz", b"not really a label")
    data = {"json": {}}

    def fixed(path: str, **kwargs):
        return lambda user: (path, kwargs)

    def own_session(user):  # a session of the user's own, to delete
        if user is None:
            return "/session/00000000-no-such-session", {}
        r = requests.put(f"{server['url']}/session/", files=[("files", ("ct.nii.gz", ct))],
                         headers=_h(idp, user), timeout=60)
        assert r.status_code == 200, r.text[:300]
        return f"/session/{r.json()['session_id']}", {}

    def upload(user):  # a new datastore case with an explicit, pseudonymous id
        return "/datastore/image", {"params": {"image": f"upload-{(user or 'probe').split('.')[0]}"},
                                    "files": {"file": ("case.zip", _zip({"ct.nii.gz": ct}))}}

    nobatch = {"label_tag": "no-such-tag", "device": "cpu", "multi_gpu": False, "max_workers": 1}
    return [
        # the viewer's requests: every role
        ("PUT", fixed("/session/", files=[("files", ("ct.nii.gz", ct))]), EVERYONE, {200}),
        ("DELETE", own_session, EVERYONE, {200}),
        ("POST", fixed("/activelearning/preference", json={}), EVERYONE, {200}),
        ("POST", fixed("/diffkt3d/preferences", json=_record()), {CLIN, ADMIN}, {201}),
        # training, batch inference, scoring: physicist / admin
        ("POST", fixed("/train/any2any", **data), DATA_ROLES, None),
        ("POST", fixed("/train/", **data), DATA_ROLES, None),
        ("POST", fixed("/train/no_such_task", params={"run_sync": "true"}, **data), DATA_ROLES, {400}),
        ("DELETE", fixed("/train/"), DATA_ROLES, {200}),
        ("POST", fixed("/batch/infer/dose", params={"images": "labeled", "run_sync": "true"}, json=nobatch),
         DATA_ROLES, {200}),
        ("DELETE", fixed("/batch/infer"), DATA_ROLES, {200}),
        ("POST", fixed("/scoring/", **data), DATA_ROLES, {200}),
        ("POST", fixed("/scoring/dice", params={"run_sync": "true"}, **data), DATA_ROLES, {400}),
        ("DELETE", fixed("/scoring/"), DATA_ROLES, {200}),
        # the datastore: physicist / admin
        ("PUT", upload, DATA_ROLES, {200}),
        ("PUT", fixed("/datastore/", params={"image": "junk-case"}, files={"file": ("c.zip", b"PK")}),
         DATA_ROLES, {422}),
        ("PUT", fixed("/datastore/label", params={"image": CASE, "tag": "edited"}, files={"label": label}),
         DATA_ROLES, {200}),
        ("PUT", fixed("/datastore/image/info", params={"image": CASE}, data={"info": '{"note": "x"}'}),
         DATA_ROLES, {200}),
        ("PUT", fixed("/datastore/label/info", params={"label": CASE, "tag": "edited"}, data={"info": "{}"}),
         DATA_ROLES, {200}),
        ("PUT", fixed("/datastore/updatelabelinfo", params={"label": CASE, "tag": "edited"}, data={"params": "{}"}),
         DATA_ROLES, {200}),
        ("DELETE", fixed("/datastore/label", params={"id": CASE, "tag": "edited"}), DATA_ROLES, {200}),
        ("DELETE", fixed("/datastore/image", params={"id": CASE}), DATA_ROLES, {409}),
        ("DELETE", fixed("/datastore/", params={"id": CASE}), DATA_ROLES, {409}),
        ("GET", fixed("/datastore/dataset", params={"limit_cases": 1}), DATA_ROLES, {200}),
        # models (DiffKT3D's tasks have no MONAI Label model file: trained models are published by runs)
        ("GET", fixed("/model/dose"), DATA_ROLES, {404}),
        ("GET", fixed("/model/info/dose"), DATA_ROLES, {404}),
        ("PUT", fixed("/model/dose", files={"file": ("m.pt", b"x")}), DATA_ROLES, {404}),
        ("DELETE", fixed("/model/dose"), DATA_ROLES, {404}),
        # model versions: physicists and admins read them, only an admin promotes (here the served one again)
        ("GET", fixed("/diffkt3d/models"), DATA_ROLES, {200}),
        ("GET", fixed("/diffkt3d/models/shipped"), DATA_ROLES, {200}),
        ("POST", fixed("/diffkt3d/models/shipped/promote", json={}), {ADMIN}, {200}),
        # admin only: the trail, the server log, reload, and writes no policy entry names (deny by default)
        ("GET", fixed("/diffkt3d/audit"), {ADMIN}, {200}),
        ("GET", fixed("/logs/"), {ADMIN}, {200}),
        ("GET", fixed("/logs/gpu"), {ADMIN}, None),
        ("POST", fixed("/infer/wsi_v2/dose", **data), {ADMIN}, None),
        ("POST", fixed("/proxy/dicom/qido/studies", **data), {ADMIN}, None),
        ("POST", fixed("/reload"), {ADMIN}, {200}),  # last: the next request re-creates the app
    ]


def test_writes_need_the_right_role(server, idp):
    """Every write / privileged route: 401 without a token and with an expired one (of a user who
    would be allowed), 403 naming the role for a token without it, the expected answer for the roles
    that may."""
    url = server["url"]
    expired = {"Authorization": f"Bearer {idp.issue(ADMIN, USERS[ADMIN][1], expires_in_s=-120)}"}
    for method, make, allowed, ok in _privileged_routes(server, idp):
        path, kwargs = make(None)
        where = (method, path)
        r = requests.request(method, url + path, timeout=60, **kwargs)
        assert r.status_code == 401, (*where, r.status_code, r.text[:200])
        r = requests.request(method, url + path, headers=expired, timeout=60, **kwargs)
        assert r.status_code == 401 and "expired" in r.json()["detail"], (*where, r.status_code, r.text[:200])
        for user in ({CLIN, PHYS, ADMIN} - allowed) | {"visitor"}:
            r = requests.request(method, url + path, headers=_h(idp, user), timeout=60, **kwargs)
            assert r.status_code == 403, (user, *where, r.status_code, r.text[:200])
            assert "requires the role" in r.json()["detail"], r.text
        for user in sorted(allowed) if ok else ():
            path, kwargs = make(user)
            r = requests.request(method, url + path, headers=_h(idp, user), timeout=120, **kwargs)
            assert r.status_code in ok, (user, method, path, r.status_code, r.text[:300])
    assert requests.get(f"{url}/info/", headers=_h(idp, CLIN), timeout=120).status_code == 200  # after /reload
    entries = _audit(server, idp)
    uploads = [e for e in entries if e["action"] == "data.image_upload" and e["status"] == 200]
    assert {e["details"]["case_id"] for e in uploads} == {"upload-phys", "upload-root"}
    assert {p.name for p in server["studies"].iterdir()} >= {CASE, "upload-phys", "upload-root"}


def test_removing_a_case_is_a_clear_409_not_a_500(server, idp):
    for path in ("/datastore/image", "/datastore/"):
        r = requests.delete(f"{server['url']}{path}", params={"id": CASE}, headers=_h(idp, PHYS), timeout=30)
        assert r.status_code == 409, (path, r.status_code, r.text[:300])
        assert "removing cases through the server is not supported" in r.json()["detail"]
    assert (server["studies"] / CASE / "ct.nii.gz").is_file()
    # the other datastore refusals are 4xx too: the read-only reference dose, an existing id, a bad tag
    r = requests.delete(f"{server['url']}/datastore/label", params={"id": CASE, "tag": "final"},
                        headers=_h(idp, PHYS), timeout=30)
    assert r.status_code == 409 and "read-only" in r.json()["detail"]
    r = requests.put(f"{server['url']}/datastore/image", params={"image": CASE},
                     files={"file": ("c.zip", _zip({"ct.nii.gz": b"x"}))}, headers=_h(idp, PHYS), timeout=30)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = requests.delete(f"{server['url']}/datastore/label", params={"id": CASE, "tag": "../x"},
                        headers=_h(idp, PHYS), timeout=30)
    assert r.status_code == 400, r.text[:300]


def test_a_datastore_upload_never_takes_its_case_id_from_the_file_name(server, idp):
    """Without `image=<id>` MONAI Label would name the case after the uploaded file, which may carry
    the patient's name: refused (400) before anything is stored, whatever the file holds."""
    case = _zip({n: (VALIDATION / CASE / n).read_bytes() for n in ("ct.nii.gz", "PTV70.nii.gz")})
    before = sorted(p.name for p in server["studies"].iterdir())
    for path in ("/datastore/image", "/datastore/"):
        r = requests.put(f"{server['url']}{path}", files={"file": (f"Doe_Janet_{PATIENT_ID}.zip", case)},
                         headers=_h(idp, ADMIN), timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert "explicit case id" in r.json()["detail"]
        assert not any(s in r.text for s in PHI_STRINGS), r.text
    assert sorted(p.name for p in server["studies"].iterdir()) == before


# -- 3. the rater comes from the token -------------------------------------------------------------------
def test_forged_rater_is_ignored(server, idp):
    r = requests.post(f"{server['url']}/diffkt3d/preferences", json=_record(rater="dr.house"),
                      headers=_h(idp, "dr.smith"), timeout=30)
    assert r.status_code == 201, r.text
    record = r.json()["record"]
    assert record["rater"] == "dr.smith"
    stored = requests.get(f"{server['url']}/diffkt3d/preferences", headers=_h(idp, "phys.jones"), timeout=30).json()
    assert [x["rater"] for x in stored["records"] if x["record_id"] == record["record_id"]] == ["dr.smith"]
    assert not [x for x in stored["records"] if x["rater"] == "dr.house"]
    # no rater in the body at all is fine too: the token says who
    body = _record()
    del body["rater"]
    r = requests.post(f"{server['url']}/diffkt3d/preferences", json=body, headers=_h(idp, "root.admin"), timeout=30)
    assert r.status_code == 201 and r.json()["record"]["rater"] == "root.admin"
    entry = next(e for e in _audit(server, idp) if e["details"].get("record_id") == record["record_id"])
    assert entry["user"] == "dr.smith" and entry["details"]["ignored_body_rater"] is True


# -- 4. audit trail ------------------------------------------------------------------------------------------
def test_training_runs_models_and_refusals_are_audited_and_only_admins_read_the_trail(server, idp):
    url, phys = server["url"], _h(idp, "phys.jones")
    request = {"from_scratch": True, "model_preset": "tiny", "model_overrides": {}, "stages.any2any.steps": 1,
               "stages.dose.steps": 1, "grid": 16, "validation.steps": 1}
    # one run to the end: its validation is audited ...
    r = requests.post(f"{url}/train/any2any", json=request, headers=phys, timeout=60)
    assert r.status_code == 200, r.text[:300]
    deadline, status = time.time() + 900, {}
    while time.time() < deadline and status.get("status") not in ("DONE", "ERROR"):
        time.sleep(3)
        status = requests.get(f"{url}/train/", headers=phys, timeout=30).json()
    assert status.get("status") == "DONE", json.dumps(status)[-1500:]
    # ... and one stopped by the physicist
    r = requests.post(f"{url}/train/any2any", json=request, headers=phys, timeout=60)
    assert r.status_code == 200, r.text[:300]
    time.sleep(1.0)
    r = requests.delete(f"{url}/train/", headers=phys, timeout=60)
    assert r.status_code == 200, r.text[:300]
    requests.put(f"{url}/model/dose", files={"file": ("m.pt", b"x")}, headers=_h(idp, "dr.smith"), timeout=30)
    # model versions: physicists see them, only an administrator changes the served one (and rolls back)
    assert requests.get(f"{url}/diffkt3d/models", headers=phys, timeout=30).status_code == 200
    assert requests.get(f"{url}/diffkt3d/models", headers=_h(idp, "dr.smith"), timeout=30).status_code == 403
    promote = f"{url}/diffkt3d/models/v1-any2any/promote"
    assert requests.post(promote, json={}, headers=phys, timeout=30).status_code == 403
    r = requests.post(promote, json={"reason": "audit test"}, headers=_h(idp, "root.admin"), timeout=30)
    assert r.status_code == 200 and r.json()["served"]["by"] == "root.admin", r.text
    r = requests.post(f"{url}/diffkt3d/models/shipped/promote", json={}, headers=_h(idp, "root.admin"), timeout=30)
    assert r.status_code == 200 and r.json()["previous"] == "v1-any2any"
    for user in ("dr.smith", "phys.jones", "visitor"):
        assert requests.get(f"{url}/diffkt3d/audit", headers=_h(idp, user), timeout=30).status_code == 403
    entries = _audit(server, idp)
    seen = {(e["user"], e["action"], e["status"]) for e in entries}
    assert ("phys.jones", "train.start", 200) in seen and ("phys.jones", "train.stop", 200) in seen
    assert ("dr.smith", "model.upload", 403) in seen
    assert ("phys.jones", "model.promote", 403) in seen and ("root.admin", "model.promote", 200) in seen
    validated = [e for e in entries if e["action"] == "model.validate"]
    assert len(validated) == 1 and validated[0]["details"]["version"] == "v1-any2any", validated
    assert validated[0]["details"]["decision"] == "keep"  # one case: nothing to validate on, not served
    assert not [e for e in entries if e["action"] == "model.promote" and e["user"] == "training-run"]
    starts = [i for i, e in enumerate(entries) if e["action"] == "train.start" and e["status"] == 200]
    assert starts[0] < entries.index(validated[0])  # who started the run precedes what it made
    assert ("anonymous", "model.upload", 401) in seen or any(e["action"] == "model.upload" and e["status"] == 401
                                                            for e in entries)
    # filters
    mine = requests.get(f"{url}/diffkt3d/audit", params={"user": "phys.jones", "action": "train."},
                        headers=_h(idp, "root.admin"), timeout=30).json()["entries"]
    assert mine and {e["user"] for e in mine} == {"phys.jones"} and all(e["action"].startswith("train.") for e in mine)
    # durable, append-only JSONL in the state dir, the same entries in the same order
    lines = (server["root"] / "state" / "audit" / "audit.jsonl").read_text().splitlines()
    on_disk = [json.loads(line) for line in lines]
    assert on_disk[: len(entries)] == entries
    times = [e["time"] for e in on_disk]
    assert times == sorted(times)


# -- 5. no patient-identifying text in the log or error messages ----------------------------------------------
def _dicom_case_files(tmp: Path) -> dict[str, bytes]:
    """The validation case as DICOM RT with a known patient identity, files named after the patient."""
    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.io.dicom_write import write_dicom_case

    out = tmp / "dicom"
    write_dicom_case(load_case_folder(VALIDATION / CASE), out, patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    return {f"Doe_Janet_{PATIENT_ID}_{p.name}": p.read_bytes() for p in sorted(out.glob("*.dcm"))[:20]}


def test_no_patient_identity_in_server_log_or_error_messages(server, idp, tmp_path):
    url, h = server["url"], _h(idp, "dr.smith")
    answers = []
    files = _dicom_case_files(tmp_path)
    # a DICOM upload as a session: the server only takes NIfTI case folders -> 400, without names
    r = requests.put(f"{url}/session/", files=[("files", (n, b)) for n, b in files.items()], headers=h, timeout=120)
    assert r.status_code == 200, r.text[:300]
    sid = r.json()["session_id"]
    r = requests.post(f"{url}/infer/dose", params={"session_id": sid, "output": "json"}, data={"params": "{}"},
                      headers=h, timeout=120)
    assert r.status_code == 400, r.text[:300]
    answers.append(r.text)
    # one file named after the patient, as a single-file session
    name, data = next(iter(files.items()))
    r = requests.put(f"{url}/session/", files=[("files", (name, data))], headers=h, timeout=120)
    if r.status_code == 200:
        r = requests.post(f"{url}/infer/dose", params={"session_id": r.json()["session_id"], "output": "json"},
                          data={"params": "{}"}, headers=h, timeout=120)
    assert r.status_code >= 400
    answers.append(r.text)
    # a NIfTI named after the patient, which the upload's header check refuses (not a NIfTI image)
    nifti = (VALIDATION / CASE / "ct.nii.gz").read_bytes()
    r = requests.put(f"{url}/session/", files=[("files", ("ct.nii.gz", nifti)),
                                              ("files", (f"Doe_Janet_{PATIENT_ID}.nii.gz", b"junk"))],
                     headers=h, timeout=120)
    assert r.status_code == 422 and "not a readable NIfTI" in r.text, r.text[:300]
    answers.append(r.text)
    # the datastore: a zip of the DICOM files as a new case (physicist), refused as not a case folder
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in list(files.items())[:3]:
            z.writestr(f"Doe_Janet/{n}", b)
    r = requests.put(f"{url}/datastore/image", params={"image": "case_x"},
                     files={"file": (f"Doe_Janet_{PATIENT_ID}.zip", buf.getvalue())},
                     headers=_h(idp, "phys.jones"), timeout=120)
    assert r.status_code >= 400
    answers.append(r.text)
    time.sleep(1.0)  # let the log handler flush
    log_text = server["log"].read_text(errors="replace")
    assert "Request Files" in log_text  # the uploads were logged ... without their names
    for s in PHI_STRINGS:
        assert s not in log_text, f"{s!r} found in the server log"
        for a in answers:
            assert s not in a, f"{s!r} found in an error message: {a[:300]}"


# -- 6. path traversal and the upload limit ---------------------------------------------------------------------
def test_path_traversal_in_ids_and_file_names_is_refused(server, idp, tmp_path):
    url, root = server["url"], server["root"]
    phys, clin = _h(idp, "phys.jones"), _h(idp, "dr.smith")
    before = sorted(p.relative_to(root) for p in root.rglob("*") if "sessions" not in p.parts)
    nifti = (VALIDATION / CASE / "ct.nii.gz").read_bytes()
    for bad in ("../evil", "../../evil", "..", f"{CASE}/../evil", "/tmp/evil", "..%2Fevil"):
        r = requests.post(f"{url}/infer/dose", params={"image": bad}, data={"params": "{}"}, headers=clin, timeout=60)
        assert r.status_code in (400, 404), (bad, r.status_code, r.text[:200])
        r = requests.post(f"{url}/diffkt3d/preferences", json=_record(case_id=bad), headers=clin, timeout=30)
        assert r.status_code == 422, (bad, r.status_code, r.text[:200])
        r = requests.put(f"{url}/datastore/image", params={"image": bad}, files={"file": ("x.nii.gz", nifti)},
                         headers=phys, timeout=60)
        assert 400 <= r.status_code < 600 and r.status_code not in (401, 403), (bad, r.status_code)
        r = requests.put(f"{url}/datastore/label", params={"image": CASE, "tag": bad},
                         files={"label": ("x.nii.gz", nifti)}, headers=phys, timeout=60)
        assert 400 <= r.status_code < 600 and r.status_code not in (401, 403), (bad, r.status_code)
        r = requests.get(f"{url}/datastore/image", params={"image": bad}, headers=clin, timeout=30)
        assert r.status_code >= 400, (bad, r.status_code)
    # a datastore upload whose case id comes from a path-like file name
    for name in ("../../evil.zip", "..\\..\\evil.nii.gz", "/tmp/evil.nii.gz"):
        r = requests.put(f"{url}/datastore/image", files={"file": (name, nifti)}, headers=phys, timeout=60)
        assert r.status_code >= 400 and r.status_code not in (401, 403), (name, r.status_code)
    # file names with path parts are reduced to their base name inside the session folder
    r = requests.put(f"{url}/session/", files=[("files", ("../../evil.nii.gz", nifti)),
                                              ("files", ("../ct.nii.gz", nifti))], headers=clin, timeout=60)
    assert r.status_code == 200
    after = sorted(p.relative_to(root) for p in root.rglob("*") if "sessions" not in p.parts)
    new = [p for p in after if p not in before and not str(p).startswith(("state", "model")) and
           not p.name.startswith("server-")]
    assert new == [], new
    assert not list(root.parent.glob("evil*")) and not (root / "studies" / "evil").exists()
    assert not list((root / "studies").glob("*evil*"))
    assert requests.get(f"{url}/info/", headers=clin, timeout=30).status_code == 200


def test_upload_size_limit_holds_with_auth_on(server, idp):
    big = b"\0" * ((MAX_UPLOAD_MB + 1) * 2**20)
    for headers in ({}, _h(idp, "dr.smith")):
        r = requests.put(f"{server['url']}/session/", files=[("files", ("ct.nii.gz", big))], headers=headers, timeout=120)
        assert r.status_code == 413 and "upload limit" in r.json()["detail"], r.text[:200]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_UPLOAD_MB + 1):
            yield b"\0" * 2**20

    r = requests.post(f"{server['url']}/diffkt3d/preferences", data=chunks(), headers={**_h(idp, "dr.smith"),
                      "Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 413, r.text[:200]
    assert requests.get(f"{server['url']}/info/", headers=_h(idp, "dr.smith"), timeout=30).status_code == 200
