"""monailabel_app.auth without a server: the policy table, token checks against a real local
OpenID Connect provider (key rotation, Keycloak realm key without discovery, provider down)."""

from __future__ import annotations

import pytest
from oidc_provider import LocalOIDCProvider

from monailabel_app.auth import (
    ADMIN,
    CLINICIAN,
    PHYSICIST,
    AuthError,
    AuthSettings,
    TokenVerifier,
    action_for,
)

ROLE_NAMES = {CLINICIAN: "diffkt3d-clinician", PHYSICIST: "diffkt3d-physicist", ADMIN: "diffkt3d-admin"}


@pytest.fixture
def idp():
    provider = LocalOIDCProvider({}).start()
    yield provider
    provider.stop()


def _verifier(idp, **kw) -> TokenVerifier:
    return TokenVerifier(AuthSettings(enabled=True, realm_uri=idp.realm_uri, timeout_s=5, **kw))


def test_policy_table():
    assert action_for("GET", "/info/").roles == (CLINICIAN, PHYSICIST, ADMIN)
    assert action_for("POST", "/infer/dose").name == "read"
    assert action_for("POST", "/diffkt3d/preferences").roles == (CLINICIAN, ADMIN)
    for method, path, name in (("POST", "/train/any2any", "train.start"), ("DELETE", "/train/", "train.stop"),
                               ("PUT", "/model/dose", "model.upload"), ("DELETE", "/model/dose", "model.delete"),
                               ("PUT", "/datastore/image", "data.image_upload"),
                               ("PUT", "/datastore/", "data.image_upload"),
                               ("PUT", "/datastore/label", "data.label_upload")):
        action = action_for(method, path)
        assert action.name == name and action.roles == (PHYSICIST, ADMIN) and action.audited
    for method, path, name in (("PUT", "/datastore/image/info", "data.info_update"),
                               ("PUT", "/datastore/label/info", "data.info_update"),
                               ("PUT", "/datastore/updatelabelinfo", "data.info_update"),
                               ("DELETE", "/datastore/image", "data.delete"), ("DELETE", "/datastore/label", "data.delete"),
                               ("DELETE", "/datastore/", "data.delete"), ("GET", "/datastore/dataset", "data.download"),
                               ("GET", "/model/dose", "model.download"), ("GET", "/model/info/dose", "model.download"),
                               ("POST", "/batch/infer/dose", "batch_infer"), ("DELETE", "/batch/infer", "batch_infer"),
                               ("POST", "/scoring/", "scoring"), ("POST", "/scoring/dice", "scoring"),
                               ("DELETE", "/scoring/", "scoring"), ("POST", "/train/", "train.start")):
        action = action_for(method, path)
        assert action.name == name and action.roles == (PHYSICIST, ADMIN) and action.audited, (method, path)
    # the viewer's own uploads and next-case requests are open to every role (clinicians included)
    for method, path in (("PUT", "/session/"), ("DELETE", "/session/abc"), ("POST", "/activelearning/preference")):
        assert action_for(method, path).roles == (CLINICIAN, PHYSICIST, ADMIN)
    for method, path in (("GET", "/diffkt3d/audit"), ("GET", "/logs/"), ("GET", "/logs/gpu"), ("POST", "/reload")):
        assert action_for(method, path).roles == (ADMIN,), (method, path)
    # unknown writes: admin only and audited (deny by default); unknown reads: any role
    unknown = action_for("POST", "/some/new/route")
    assert unknown.roles == (ADMIN,) and unknown.audited
    assert action_for("GET", "/some/new/route").name == "read"


def test_roles_claim_paths_and_role_mapping(idp):
    token = idp.issue("u", ["diffkt3d-physicist", "other"], resource_access={"slicer": {"roles": ["diffkt3d-admin"]}})
    assert _verifier(idp).verify(token).roles == (PHYSICIST,)
    client_roles = _verifier(idp, roles_claim="resource_access#slicer#roles").verify(token)
    assert client_roles.username == "u" and client_roles.roles == (ADMIN,)
    renamed = _verifier(idp, role_names={**ROLE_NAMES, PHYSICIST: "other"}).verify(token)
    assert renamed.roles == (PHYSICIST,)


def test_audience_and_username_are_checked(idp):
    v = _verifier(idp)  # the audience is checked by default
    assert v.settings.audience == "diffkt3d" and v.settings.verify_audience
    with pytest.raises(AuthError) as err:
        v.verify(idp.issue("u", [], aud="account"))  # Keycloak's default audience: another application
    assert err.value.status == 401 and "audience" in err.value.detail.lower()
    assert v.verify(idp.issue("u", [], aud="diffkt3d")).username == "u"
    with pytest.raises(AuthError, match="aud"):  # a token without any audience is refused too
        v.verify(idp.issue("u", [], aud=None))
    # opting out is explicit: then any audience passes
    assert _verifier(idp, verify_audience=False).verify(idp.issue("u", [], aud="account")).username == "u"
    with pytest.raises(AuthError, match="user name"):
        _verifier(idp).verify(idp.issue("", []))


def test_key_rotation_is_picked_up_from_the_jwks(idp):
    v = _verifier(idp, jwks_cooldown_s=0)
    assert v.verify(idp.issue("u", [])).username == "u"
    old = idp.issue("u", [])
    idp.rotate()
    assert v.verify(idp.issue("u", [])).username == "u"  # new kid -> key set fetched again
    with pytest.raises(AuthError) as err:
        v.verify(old)
    assert err.value.status == 401
    # within the cooldown an unknown key id is refused rather than fetched again
    v2 = _verifier(idp, jwks_cooldown_s=600)
    assert v2.verify(idp.issue("u", [])).username == "u"
    idp.rotate()
    with pytest.raises(AuthError):
        v2.verify(idp.issue("u", []))


def test_keycloak_realm_public_key_without_discovery(idp):
    idp.discovery = False
    v = _verifier(idp)
    assert v.verify(idp.issue("u", [])).username == "u"
    with pytest.raises(AuthError):
        v.verify(idp.issue("u", [], key=__import__("oidc_provider").new_key()))


def test_provider_down_is_503_and_recovers(idp):
    v = _verifier(idp)
    token = idp.issue("u", [])
    idp.stop()
    with pytest.raises(AuthError) as err:
        v.verify(token)
    assert err.value.status == 503 and "unreachable" in err.value.detail
    idp.start()  # on a new port: point the settings at it, as a restarted provider would be
    v.settings.realm_uri = idp.realm_uri
    assert v.verify(idp.issue("u", [])).username == "u"


# -- no unaudited change: the write-ahead journal ---------------------------------------------------------
def _app_with_audit(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from diffkt3d.audit import AuditLog
    from diffkt3d.preferences import PreferenceStore, ServedCandidates
    from monailabel_app.preference_routes import Provenance
    from monailabel_app.routes import install

    api = FastAPI()
    store, audit = PreferenceStore(tmp_path / "prefs"), AuditLog(tmp_path / "audit")
    served = ServedCandidates(tmp_path / "prefs")
    served.add("case_a", "r1", ["c0", "c1"])  # what the dose task writes when it serves candidates
    install(api, store, audit, max_upload_bytes=2**20, unavailable_trainers={"scardnft": "not in this build"},
            threaded_infer=False, provenance=Provenance(served, has_case=lambda case_id: False))
    return TestClient(api), store, audit


RECORD = {"case_id": "case_a", "chosen_id": "c0", "rater": "r1",
          "candidates": [{"id": "c0", "seed": 0, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}]}


def test_an_audited_action_is_journalled_before_it_runs(tmp_path):
    from diffkt3d.audit import AuditLog
    from monailabel_app.auth import journal_for

    client, store, audit = _app_with_audit(tmp_path)
    assert client.post("/diffkt3d/preferences", json=RECORD).status_code == 201
    journal, _ = journal_for(audit).read()
    entries, _ = audit.read()
    assert [(e.action, e.status, e.details["stage"]) for e in journal] == [("preference.record", 0, "before")]
    assert [(e.action, e.status) for e in entries] == [("preference.record", 201)]
    assert entries[0].details["request"] == journal[0].details["request"]  # attempt and outcome linked
    assert journal_for(audit).path == AuditLog(tmp_path / "audit" / "journal").path


def test_writes_are_refused_with_503_when_the_audit_entry_cannot_be_written_first(tmp_path):
    """A real write failure (the journal file is a directory: fails for root too): nothing is done."""
    from monailabel_app.auth import journal_for

    client, store, audit = _app_with_audit(tmp_path)
    journal = journal_for(audit)
    journal.path.mkdir()  # open(O_APPEND) now fails with IsADirectoryError
    r = client.post("/diffkt3d/preferences", json=RECORD)
    assert r.status_code == 503 and "audit trail unavailable" in r.json()["detail"]
    assert "nothing was changed" in r.json()["detail"]
    assert store.read().records == []
    r = client.post("/train/scardnft", json={})  # train start: refused by the audit layer, not by the trainer
    assert r.status_code == 503 and "audit" in r.json()["detail"]
    # the refusal itself is in the trail; reads are not audited and still work
    assert [(e.action, e.status) for e in audit.read()[0]] == [("preference.record", 503), ("train.start", 503)]
    assert client.get("/diffkt3d/preferences").status_code == 200
    # the journal is back: the write goes through again
    journal.path.rmdir()
    assert client.post("/diffkt3d/preferences", json=RECORD).status_code == 201
    assert len(store.read().records) == 1


def test_an_outcome_that_cannot_go_to_the_trail_is_kept_in_the_journal(tmp_path):
    from monailabel_app.auth import journal_for

    client, store, audit = _app_with_audit(tmp_path)
    audit.path.mkdir()  # the trail itself fails, the journal works: the attempt was recorded before
    assert client.post("/diffkt3d/preferences", json=RECORD).status_code == 201
    journal, _ = journal_for(audit).read()
    assert [(e.action, e.status) for e in journal] == [("preference.record", 0), ("preference.record", 201)]
    assert journal[0].details["request"] == journal[1].details["request"]
    assert journal[1].details["case_id"] == "case_a"


def test_audience_settings_from_conf():
    from monailabel_app.auth import DEFAULT_AUDIENCE

    assert AuthSettings.from_monailabel({}).audience == DEFAULT_AUDIENCE
    assert AuthSettings.from_monailabel({}).verify_audience
    assert AuthSettings.from_monailabel({"auth_audience": "dose-server"}).audience == "dose-server"
    assert not AuthSettings.from_monailabel({"auth_verify_audience": "false"}).verify_audience
    with pytest.raises(ValueError, match="auth_audience is empty"):
        AuthSettings.from_monailabel({"auth_audience": " "})
    with pytest.raises(ValueError, match="auth_verify_audience must be true or false"):
        AuthSettings.from_monailabel({"auth_verify_audience": "no"})
