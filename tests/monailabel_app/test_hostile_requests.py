"""Hostile ids, parameters, plan.json values, preferences and tokens against a REAL server.

Two tables, one server each (module-scoped: a server start costs about a minute): the first with
authentication off, the second with authentication on against the local OpenID Connect provider.
Every row sends one hostile request and asserts

* the HTTP status (4xx, never a 500; the one 200 is a retried preference, which must not be stored
  twice),
* a message naming the problem,
* that the datastore (case folders and the server's case info), the preference store and the
  served-candidates registry are unchanged, and that the audit trail gained at most the entry of
  the attempt itself, with the answered status.

Cases are small synthetic folders (diffkt3d.data.synthetic) and the model a random `tiny`
checkpoint: only the refusals matter here, not dose values. docs/security.md "Hostile requests"
lists what is covered.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from oidc_provider import CLIENT_ID, LocalOIDCProvider  # noqa: E402
from server_process import start_server, stop_server  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

from diffkt3d.data.synthetic import make_synthetic_case  # noqa: E402
from diffkt3d.io.case_folder import plan_to_dict, save_case_folder  # noqa: E402

pytestmark = pytest.mark.server
pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")

REPO = Path(__file__).resolve().parents[2]
CASE = "syn_001"
SHIPPED_TEMPLATE = REPO / "diffkt3d" / "scorecard" / "templates" / "openkbp_hn.yaml"
KEY = "retry-0123456789abcdef"  # the idempotency key of the preference stored by the fixture
USERS = {"dr.smith": ("pw-smith", ["diffkt3d-clinician"]), "phys.jones": ("pw-jones", ["diffkt3d-physicist"]),
         "visitor": ("pw-visitor", ["offline_access"])}


# -- servers ------------------------------------------------------------------------------------------
def _case_dir(root: Path, name: str, plan: dict[str, Any] | None = None) -> Path:
    case = make_synthetic_case(shape=(24, 24, 20), case_id=name)
    case.dose_gy = None
    folder = save_case_folder(case, root / name)
    if plan is not None:
        (folder / "plan.json").write_text(json.dumps({**plan_to_dict(case), **plan}))
    return folder


def _start(tmp_path_factory, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp(name)
    studies = root / "studies"
    _case_dir(studies, CASE)
    conf = {"max_upload_mb": "5", "model_dir": str(root / "model"), "state_dir": str(root / "state"),
            "device": "cpu", "model": str(write_tiny_checkpoint(root / "tiny.pt", grid=16))}
    try:
        proc, url = start_server(root, studies, conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return {"url": url, "root": root, "studies": studies, "state": root / "state", "proc": proc}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Auth off; CASE has served two candidates and one preference stored under KEY."""
    srv = _start(tmp_path_factory, "hostile")
    r = requests.post(f"{srv['url']}/infer/dose", params={"image": CASE, "output": "json"},
                      data={"params": json.dumps({"candidates": 2, "steps": 1})}, timeout=300)
    assert r.status_code == 200, r.text
    srv["served"] = [c["id"] for c in r.json()["candidates"]]
    r = requests.post(f"{srv['url']}/diffkt3d/preferences", json=_pref(srv, record_id=KEY), timeout=30)
    assert r.status_code == 201, r.text
    srv["stored"] = r.json()["record"]
    yield srv
    stop_server(srv["proc"])


@pytest.fixture(scope="module")
def idp():
    provider = LocalOIDCProvider(USERS).start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, idp):
    srv = _start(tmp_path_factory, "hostile-auth", {"MONAI_LABEL_AUTH_ENABLE": "true",
                                                     "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
                                                     "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID})
    yield srv
    stop_server(srv["proc"])


# -- requests -----------------------------------------------------------------------------------------
def _pref(srv: dict[str, Any], case_id: str = CASE, chosen: int = 1, **extra: Any) -> dict[str, Any]:
    ids = srv.get("served") or ["c0-seed0", "c1-seed1"]
    return {"case_id": case_id, "chosen_id": ids[chosen], "rater": "dr_x",
            "candidates": [{"id": c, "seed": k, "model_version": "m"} for k, c in enumerate(ids)], **extra}


def _infer(srv: dict[str, Any], params: Any = None, task: str = "dose", raw_params: str | None = None,
           headers: dict[str, str] | None = None, **query: str) -> requests.Response:
    body = raw_params if raw_params is not None else json.dumps(params or {})
    return requests.post(f"{srv['url']}/infer/{task}", params={"output": "json", **query}, data={"params": body},
                         headers=headers, timeout=120)


def _session_with_plan(srv: dict[str, Any], plan: dict[str, Any]) -> str:
    """A session upload (the case folder's files) whose plan.json carries `plan`."""
    folder = _case_dir(srv["root"] / "uploads" / hashlib.sha1(repr(plan).encode()).hexdigest()[:8], "case", plan)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    r = requests.put(f"{srv['url']}/session/", files=files, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def _plan_infer(plan: dict[str, Any]) -> Callable[[dict[str, Any]], requests.Response]:
    return lambda srv: _infer(srv, session_id=_session_with_plan(srv, plan))


def _rx(value: Any) -> dict[str, Any]:
    return {"structures": {"PTV70": {"role": "target", "prescription_gy": value}}}


@dataclass(frozen=True)
class Row:
    kind: str
    send: Callable[[dict[str, Any]], requests.Response]
    status: int
    words: tuple[str, ...]  # each must appear in the message (case-insensitive)


BIG_YAML = "# padding\n" * 7000 + SHIPPED_TEMPLATE.read_text()
ROWS = [
    # ids
    Row("id: path traversal", lambda s: _infer(s, image="../" + CASE), 400, ("not a valid id",)),
    Row("id: traversal inside", lambda s: _infer(s, image=f"{CASE}/../{CASE}"), 400, ("not a valid id",)),
    Row("id: absolute path", lambda s: _infer(s, image="/etc"), 400, ("file-system paths",)),
    Row("id: overlong", lambda s: _infer(s, image="a" * 300), 400, ("at most 128 characters",)),
    Row("id: unicode", lambda s: _infer(s, image="pätiënt_ü"), 400, ("not a valid id",)),
    Row("id: unknown case", lambda s: _infer(s, image="syn_999"), 404, ("no such case",)),
    # parameters
    Row("template: existing server path", lambda s: _infer(s, {"template": str(SHIPPED_TEMPLATE)}, image=CASE),
        422, ("must name a shipped scorecard template", "template_yaml")),
    Row("template: missing server path", lambda s: _infer(s, {"template": "/srv/missing/x.yaml"}, image=CASE),
        422, ("must name a shipped scorecard template",)),
    Row("template: system file", lambda s: _infer(s, {"template": "/etc/passwd"}, image=CASE),
        422, ("must name a shipped scorecard template",)),
    Row("template_yaml: oversize", lambda s: _infer(s, {"template_yaml": BIG_YAML}, image=CASE),
        413, ("template_yaml", "limit")),
    Row("template_yaml: invalid", lambda s: _infer(s, {"template_yaml": "items: [{id: x}]"}, image=CASE),
        422, ("template_yaml", "missing")),
    Row("unknown key (dose)", lambda s: _infer(s, {"step": 3}, image=CASE),
        422, ("unknown parameter", "'step'", "known parameters", "steps")),
    Row("unknown key (impute_ct)", lambda s: _infer(s, {"candidates": 2}, task="impute_ct", image=CASE),
        422, ("unknown parameter", "'candidates'", "['job_id', 'seed', 'steps']")),
    Row("MONAI Label key in params", lambda s: _infer(s, {"timeout": "soon"}, image=CASE),
        422, ("unknown parameter", "'timeout'")),
    Row("params sets the image", lambda s: _infer(s, {"image": "/etc"}, image=CASE), 422, ("may not set", "image")),
    Row("params is a JSON list", lambda s: _infer(s, raw_params="[1, 2]", image=CASE), 400, ("json object", "list")),
    Row("params is not JSON", lambda s: _infer(s, raw_params="{steps: 1", image=CASE), 400, ("not valid json",)),
    Row("empty image=", lambda s: _infer(s, image=""), 400, ("no case given",)),
    Row("steps 0", lambda s: _infer(s, {"steps": 0}, image=CASE), 422, ("'steps'", "[1, 100]", "found 0")),
    Row("steps -1", lambda s: _infer(s, {"steps": -1}, image=CASE), 422, ("'steps'", "found -1")),
    Row("steps huge", lambda s: _infer(s, {"steps": 10**12}, image=CASE), 422, ("'steps'", "[1, 100]")),
    Row("steps: 5000 digits", lambda s: _infer(s, {"steps": "9" * 5000}, image=CASE), 422, ("'steps'", "characters")),
    Row("candidates 0", lambda s: _infer(s, {"candidates": 0}, image=CASE), 422, ("'candidates'", "found 0")),
    Row("candidates huge", lambda s: _infer(s, {"candidates": 10_000}, image=CASE), 422, ("'candidates'", "[1, 16]")),
    Row("wrong type: steps text", lambda s: _infer(s, {"steps": "ten"}, image=CASE), 422, ("'steps'", "'ten'")),
    Row("wrong type: steps list", lambda s: _infer(s, {"steps": [5]}, image=CASE), 422, ("'steps'", "[5]")),
    Row("wrong type: preview", lambda s: _infer(s, {"preview": "maybe"}, image=CASE), 422, ("'preview'", "true or false")),
    Row("wrong type: candidate id", lambda s: _infer(s, {"request_id": "../x", "candidate_id": "c0"}, image=CASE),
        422, ("request_id", "not a valid id")),
    # plan.json (a session upload; the check runs in the core case loading, before the model)
    Row("plan: 1e6 Gy", _plan_infer(_rx(1e6)), 422, ("ptv70", "plan.json", "(0, 150] gy", "1000000.0")),
    Row("plan: negative Gy", _plan_infer(_rx(-70)), 422, ("ptv70", "(0, 150] gy", "-70")),
    Row("plan: NaN Gy", _plan_infer(_rx(float("nan"))), 422, ("ptv70", "prescription_gy", "finite", "nan")),
    Row("plan: Gy as text", _plan_infer(_rx("seventy")), 422, ("ptv70", "must be a number of gy", "'seventy'")),
    Row("plan: 0 fractions", _plan_infer({"fractions": 0}), 422, ("fractions", "integer >= 1", "found 0")),
    Row("plan: fractions as text", _plan_infer({"fractions": "35"}), 422, ("fractions", "'35'")),
    # preferences
    Row("preference: unknown case",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json=_pref(s, "syn_404"), timeout=30),
        404, ("syn_404", "not in the datastore")),
    Row("preference: unserved candidate",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json={**_pref(s), "candidates": [
            {"id": s["served"][0], "seed": 0, "model_version": "m"}, {"id": "c9-seed9", "seed": 9, "model_version": "m"}],
            "chosen_id": "c9-seed9"}, timeout=30),
        422, ("c9-seed9", "never served", "external")),
    Row("preference: duplicate retry",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json=_pref(s, record_id=KEY), timeout=30),
        200, ()),
    Row("preference: key reused for another choice",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json=_pref(s, chosen=0, record_id=KEY), timeout=30),
        409, (KEY, "different content")),
    Row("preference: body is a list",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json=[_pref(s)], timeout=30),
        422, ("json object",)),
    Row("preference: bad record_id",
        lambda s: requests.post(f"{s['url']}/diffkt3d/preferences", json=_pref(s, record_id="../../x"), timeout=30),
        422, ("record_id must be",)),
    # other routes
    Row("activelearning/random",
        lambda s: requests.post(f"{s['url']}/activelearning/random", json={}, timeout=30),
        404, ("unknown active-learning strategy", "'random'", "preference")),
    Row("train: unknown key (a server path)",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"config": "/etc/x.yaml"}, timeout=30),
        422, ("unknown parameter", "'config'", "known parameters")),
    Row("train: body is a list",
        lambda s: requests.post(f"{s['url']}/train/any2any", json=[1], timeout=30), 422, ("json object",)),
    Row("train: a value of the wrong type",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"stages.dose.steps": "many"}, timeout=30),
        422, ("stages.dose.steps", "expected int", "'many'", "cpu-default.yaml")),
    Row("train: unknown key inside a stage",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"stages": {"dose": {"stepz": 5}}}, timeout=30),
        422, ("stages.dose.stepz", "known stage keys")),
    Row("train: a server-decided key",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"out_dir": "/tmp/elsewhere"}, timeout=30),
        422, ("out_dir", "decided by the server")),
    Row("train: the start model named by the client",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"init_from": "/etc/passwd"}, timeout=30),
        422, ("init_from", "decided by the server")),
    Row("train: a bad validation rule",
        lambda s: requests.post(f"{s['url']}/train/any2any", json={"validation.rule.min_cases": 0}, timeout=30),
        422, ("min_cases must be an integer >= 1", "validation.yaml")),
    Row("models: promote a path instead of a version",
        lambda s: requests.post(f"{s['url']}/diffkt3d/models/..%2F..%2Fetc/promote", json={}, timeout=30),
        404, ()),
    Row("models: promote an unknown version",
        lambda s: requests.post(f"{s['url']}/diffkt3d/models/v7-any2any/promote", json={}, timeout=30),
        404, ("no model version 'v7-any2any'", "shipped")),
    Row("models: a reason longer than 500 characters",
        lambda s: requests.post(f"{s['url']}/diffkt3d/models/shipped/promote", json={"reason": "x" * 501},
                                timeout=30),
        422, ()),
]


# -- what must not change -------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _stored(srv: dict[str, Any]) -> dict[str, Any]:
    state = srv["state"]
    prefs = state / "preferences"
    return {"datastore": _tree(srv["studies"]), "case info": _tree(state / "info"),
            "model versions": _tree(state / "models") if (state / "models").is_dir() else {},
            "preferences": (prefs / "preferences.jsonl").read_bytes() if (prefs / "preferences.jsonl").exists() else b"",
            "served": (prefs / "served_candidates.jsonl").read_bytes()
            if (prefs / "served_candidates.jsonl").exists() else b""}


def _audit(srv: dict[str, Any]) -> list[dict[str, Any]]:
    path = srv["state"] / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check(srv: dict[str, Any], kind: str, status: int, words: tuple[str, ...],
           send: Callable[[], requests.Response]) -> None:
    """Send one hostile request; assert its answer and that nothing but the audit entry changed."""
    before, audit_before = _stored(srv), _audit(srv)
    r = send()
    assert r.status_code == status, (kind, r.status_code, r.text[:500])
    assert r.status_code < 500
    if r.status_code >= 400:
        detail = str(r.json()["detail"]).lower()
        for word in words:
            assert word.lower() in detail, (kind, word, detail[:500])
        assert str(srv["root"]).lower() not in detail, (kind, "a server path in the message", detail)
    assert _stored(srv) == before, (kind, "stored data changed")
    audit_after = _audit(srv)
    assert audit_after[:len(audit_before)] == audit_before, (kind, "earlier audit entries changed")
    # Rows that send a case through a session upload first: that upload is audited too (and allowed).
    new = [e for e in audit_after[len(audit_before):] if not (e["action"] == "session.upload" and e["status"] == 200)]
    assert len(new) <= 1 and all(e["status"] == r.status_code for e in new), (kind, new)


@pytest.mark.parametrize("row", ROWS, ids=[r.kind for r in ROWS])
def test_hostile_request_is_refused_and_changes_nothing(server, row):
    _check(server, row.kind, row.status, row.words, lambda: row.send(server))


def test_the_template_answer_is_the_same_whether_a_server_file_exists_or_not(server):
    answers = []
    for path in (SHIPPED_TEMPLATE, REPO / "no" / "such.yaml", Path("/etc/passwd")):
        r = _infer(server, {"template": str(path)}, image=CASE)
        answers.append(r.json()["detail"].replace(repr(str(path)), "<value>"))
    assert len(set(answers)) == 1 and "root:" not in answers[0] and "items" not in answers[0], answers


def test_the_duplicate_retry_answers_the_stored_record(server):
    r = requests.post(f"{server['url']}/diffkt3d/preferences", json=_pref(server, record_id=KEY), timeout=30)
    assert r.status_code == 200 and r.json()["record"] == server["stored"]


def test_datastore_listings_carry_ids_not_server_paths(server):
    for output in ("all", "train", None):
        r = requests.get(f"{server['url']}/datastore/", params={"output": output} if output else {}, timeout=30)
        assert r.status_code == 200 and str(server["studies"]) not in r.text, (output, r.text[:300])
    listing = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30).json()
    assert listing[CASE]["image"] == {"id": CASE}
    r = requests.post(f"{server['url']}/activelearning/preference", json={}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == CASE and str(server["root"]) not in r.text


# -- authentication on: one server for the auth table ----------------------------------------------------
def _auth_row(kind: str, user: str | None, token_kw: dict[str, Any], method: str, path: str, status: int,
              words: tuple[str, ...]) -> tuple[str, str | None, dict[str, Any], str, str, int, tuple[str, ...]]:
    return kind, user, token_kw, method, path, status, words


AUTH_ROWS = [
    _auth_row("no token", None, {}, "GET", "/info/", 401, ("not authenticated",)),
    _auth_row("expired token", "dr.smith", {"expires_in_s": -120}, "GET", "/info/", 401, ("expired",)),
    _auth_row("wrong audience", "dr.smith", {"aud": "account"}, "GET", "/info/", 401, ("audience",)),
    _auth_row("no audience", "dr.smith", {"aud": None}, "GET", "/info/", 401, ("aud",)),
    _auth_row("wrong audience on a write", "dr.smith", {"aud": "other-app"}, "POST", "/diffkt3d/preferences", 401,
              ("audience",)),
    _auth_row("no DiffKT3D role", "visitor", {}, "GET", "/info/", 403, ("visitor",)),
    _auth_row("wrong role: physicist records a preference", "phys.jones", {}, "POST", "/diffkt3d/preferences", 403,
              ("diffkt3d-clinician",)),
    _auth_row("wrong role: clinician starts training", "dr.smith", {}, "POST", "/train/any2any", 403,
              ("diffkt3d-physicist",)),
]


@pytest.mark.parametrize("kind, user, token_kw, method, path, status, words", AUTH_ROWS,
                         ids=[r[0] for r in AUTH_ROWS])
def test_hostile_token_is_refused_and_changes_nothing(auth_server, idp, kind, user, token_kw, method, path, status,
                                                      words):
    headers = {} if user is None else {"Authorization": f"Bearer {idp.issue(user, USERS[user][1], **token_kw)}"}
    body = _pref(auth_server, external=True) if path == "/diffkt3d/preferences" else {}
    _check(auth_server, kind, status, words, lambda: requests.request(method, f"{auth_server['url']}{path}", json=body,
                                                                      headers=headers, timeout=30))
