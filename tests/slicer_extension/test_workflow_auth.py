"""The module's login and bearer token against a real DiffKT3D server with authentication ON.

Server: `monailabel start_server` subprocess with `MONAI_LABEL_AUTH_ENABLE=true`, validating tokens
against a real local OpenID Connect provider (tests/monailabel_app/oidc_provider.py: RS256,
discovery, JWKS, password grant). The workflow runs on a real MRML scene (slicer-core).
"""

from __future__ import annotations

import shutil

import pytest
import requests

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.client import AuthenticationRequired, DiffKT3DClient, ServerError
from DiffKT3DLib.worker import ThreadRunner, wait_for
from DiffKT3DLib.workflow import DoseRequest, Workflow
from oidc_provider import CLIENT_ID, LocalOIDCProvider
from server_process import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

USERS = {"dr.smith": ("pw-smith", ["diffkt3d-clinician"]), "phys.jones": ("pw-jones", ["diffkt3d-physicist"])}


@pytest.fixture(scope="module")
def idp():
    provider = LocalOIDCProvider(USERS).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, idp, case_dir, tiny_checkpoint):
    pytest.importorskip("monailabel", reason="monailabel is not installed (see docs/server.md)")
    root = tmp_path_factory.mktemp("auth-server")
    shutil.copytree(case_dir, root / "studies" / case_dir.name)
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
           "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID}
    conf = {"model": str(tiny_checkpoint), "model_dir": str(root / "model"), "state_dir": str(root / "state")}
    try:
        proc, url = start_server(root, root / "studies", conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    stop_server(proc)


@pytest.fixture
def workflow(scene, auth_server, tmp_path):
    wf = Workflow(scene, DiffKT3DClient(auth_server), ThreadRunner(), work_dir=tmp_path / "work")
    yield wf
    wf.close()


def _run(wf, job, timeout_s=600):
    wait_for(wf.runner, job, timeout_s)
    return job


def test_login_with_password_sends_the_token(workflow, auth_server):
    wf = workflow
    assert wf.client.auth_enabled() is True
    with pytest.raises(AuthenticationRequired, match="requires a login"):
        wf.client.info()
    errors, users = [], []
    _run(wf, wf.login("dr.smith", "wrong", on_done=users.append, on_error=errors.append))
    assert len(errors) == 1 and isinstance(errors[0], AuthenticationRequired) and "login failed" in str(errors[0])
    errors.clear()
    _run(wf, wf.login("dr.smith", "pw-smith", on_done=users.append, on_error=errors.append))
    assert not errors, errors
    assert users == ["dr.smith"] and wf.client.username == "dr.smith" and wf.rater("") == "dr.smith"
    assert wf.client.info()["diffkt3d"]["auth"] is True
    with pytest.raises(ValueError, match="user name and password"):
        wf.login("dr.smith", "")


def test_pasted_token_expired_or_valid_and_roles_reach_the_user(workflow, idp):
    wf = workflow
    errors, users = [], []
    _run(wf, wf.login(token=idp.issue("phys.jones", USERS["phys.jones"][1], expires_in_s=-120),
                      on_done=users.append, on_error=errors.append))
    assert len(errors) == 1 and isinstance(errors[0], AuthenticationRequired) and "expired" in str(errors[0])
    errors.clear()
    _run(wf, wf.login(token=idp.issue("phys.jones", USERS["phys.jones"][1]), on_done=users.append,
                      on_error=errors.append))
    assert not errors and users == ["phys.jones"]
    record = {"case_id": "pt_201", "chosen_id": "c0", "rater": "phys.jones",
              "candidates": [{"id": "c0", "seed": 0, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}]}
    with pytest.raises(ServerError) as err:  # physicists do not record preferences by default
        wf.client.record_preference(record)
    assert err.value.status == 403 and "diffkt3d-clinician" in err.value.detail


def test_dose_and_preference_through_the_module_with_auth_on(workflow, loaded_case, auth_server, idp):
    """The whole module path (session upload, infer, preference) carries the token; the server
    records the logged-in clinician as rater whatever the rater field says."""
    wf = workflow
    errors = []
    _run(wf, wf.login("dr.smith", "pw-smith", on_error=errors.append))
    _run(wf, wf.connect(on_error=errors.append), 60)
    assert not errors, errors
    ct, seg = loaded_case
    request = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg), candidates=2, steps=2, seed=3)
    _run(wf, wf.request_dose(request, on_error=errors.append))
    assert not errors, errors
    stored = []
    _run(wf, wf.send_preference(wf.candidate_set.best_id, "someone.else", "ok", on_done=stored.append,
                                on_error=errors.append))
    assert not errors, errors
    assert stored[0]["rater"] == "dr.smith"
    token = idp.issue("dr.smith", USERS["dr.smith"][1])
    got = requests.get(f"{auth_server}/diffkt3d/preferences", headers={"Authorization": f"Bearer {token}"},
                       timeout=30).json()
    assert [r["rater"] for r in got["records"] if r["record_id"] == stored[0]["record_id"]] == ["dr.smith"]


def test_auth_off_server_needs_no_login(diffkt3d_server):
    client = DiffKT3DClient(diffkt3d_server)
    assert client.auth_enabled() is False
    assert client.info()["diffkt3d"]["auth"] is False
