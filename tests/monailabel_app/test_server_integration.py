"""A REAL MONAI Label server with the DiffKT3D app, started once per module, talked to over HTTP.

Uses a temporary studies dir with copies of OpenKBP validation cases, a temporary model dir and
preference store, and the shipped model when diffkt3d/weights holds it (else a random `tiny`
checkpoint: then only shapes/grids/formats are meaningful, not dose values).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from server_process import start_server, stop_server
from tiny_model import write_tiny_checkpoint

from diffkt3d.inference import DOSE_RESULT_SCHEMA, default_model_path

pytestmark = pytest.mark.server

VALIDATION = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation")
CASES = ("pt_201", "pt_202")
SHIPPED = default_model_path().is_file()
MAX_UPLOAD_MB = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not all((VALIDATION / c).is_dir() for c in CASES):
        pytest.skip("OpenKBP validation cases not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    for c in CASES:
        shutil.copytree(VALIDATION / c, studies / c)
    conf = {"max_upload_mb": str(MAX_UPLOAD_MB), "model_dir": str(root / "model"),
            "state_dir": str(root / "state"), "device": "cpu"}
    env = {}
    if not SHIPPED:
        # A random tiny model in the "shipped model" slot (lowest priority), so a model trained by
        # the server still takes over as it would from the real shipped one.
        env["DIFFKT3D_MODEL"] = str(write_tiny_checkpoint(root / "tiny.pt"))
    try:
        proc, url = start_server(root, studies, conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"url": url, "root": root, "studies": studies, "proc": proc}
    stop_server(proc)


def _multipart(resp: requests.Response) -> tuple[dict, bytes]:
    """Split MONAI Label's multipart infer response into (params JSON, image bytes)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {}
    for part in MultipartDecoder.from_response(resp).parts:
        disp = part.headers[b"Content-Disposition"].decode()
        name = disp.split('name="')[1].split('"')[0]
        parts[name] = part.content
    return json.loads(parts["params"]), parts["image"]


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _infer(server, task: str, params: dict | None = None, timeout: float = 600, **query) -> requests.Response:
    return requests.post(f"{server['url']}/infer/{task}", params={"output": "all", **query},
                         data={"params": json.dumps(params or {})}, timeout=timeout)


def _session(server, files: dict[str, bytes]) -> str:
    r = requests.put(f"{server['url']}/session/", files=[("files", (n, b)) for n, b in files.items()], timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def _case_files(case: str, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    folder = VALIDATION / case
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))
            if p.name != "dose.nii.gz" and (names is None or p.name in names)}


def _assert_alive(server) -> None:
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


# -- discovery -------------------------------------------------------------------------------------
def test_info_lists_all_tasks(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert {"dose", "impute_ct", "impute_ptv", "impute_oar"} <= set(info["models"])
    assert {"any2any", "scardnft"} <= set(info["trainers"])
    assert "preference" in info["strategies"]
    assert info["datastore"]["total"] == len(CASES)
    assert info["diffkt3d"]["model_version"]
    # The served model records no passing imputation benchmark: the gate marks every impute task.
    for task in ("impute_ct", "impute_ptv", "impute_oar"):
        quality = info["models"][task]["quality"]
        assert quality["status"] == "experimental" and quality["reason"], task
        assert "(experimental" in info["models"][task]["description"]
    assert "quality" not in info["models"]["dose"]


# -- dose -------------------------------------------------------------------------------------------
def test_dose_on_datastore_case(server):
    r = _infer(server, "dose", {"preview": True, "candidates": 2, "seed": 3}, image="pt_201")
    assert r.status_code == 200, r.text
    meta, image = _multipart(r)
    dose_img, ct_img = _nifti(image), nib.load(str(VALIDATION / "pt_201" / "ct.nii.gz"))
    dose = np.asarray(dose_img.dataobj)
    assert dose.dtype == np.float32 and dose.shape == ct_img.shape
    assert np.allclose(dose_img.affine, ct_img.affine)
    assert float(dose.min()) >= 0.0 and np.isfinite(dose).all()
    assert meta["steps"] == 1 and meta["seed"] == 3 and meta["model_version"]
    # the core's dose-result description (what `diffkt3d predict` writes) plus transport-only fields
    assert meta["schema"] == DOSE_RESULT_SCHEMA and meta["task"] == "dose" and meta["preview"] is True
    assert meta["case"]["id"] == "pt_201" and meta["case"]["source"] == "datastore"
    assert {"sample_s", "dvh_s", "total_s"} <= set(meta["timings"]) and "load_s" in meta["request_timings"]
    assert [c["seed"] for c in meta["candidates"]] == [3, 4]
    assert meta["chosen_id"] in [c["id"] for c in meta["candidates"]]
    assert {"total", "max_total", "items"} <= set(meta["scorecard"])
    items = meta["candidates"][0]["scorecard_items"]
    assert items and len(items) == len([i for i in meta["candidates"][0]["scorecard"]["items"] if i["score"] is not None])
    # the best-of-n image is the candidate with the highest Scorecard total
    best = max(meta["candidates"], key=lambda c: c["scorecard_total"])
    assert meta["chosen_id"] == best["id"] and meta["scorecard"]["total"] == best["scorecard_total"]
    # DVH numbers must describe the returned image: recompute two independently with numpy
    ptv = np.asarray(nib.load(str(VALIDATION / "pt_201" / "PTV70.nii.gz")).dataobj) > 0.5
    assert meta["dvh"]["PTV70"]["Dmean"] == pytest.approx(float(dose[ptv].mean()), abs=1e-3)
    assert meta["dvh"]["PTV70"]["Dmax"] == pytest.approx(float(dose[ptv].max()), abs=1e-3)
    # fetching a stored candidate returns exactly that candidate's dose, without re-sampling
    r2 = _infer(server, "dose", {"request_id": meta["request_id"], "candidate_id": meta["chosen_id"]},
                image="pt_201")
    assert r2.status_code == 200, r2.text
    assert np.array_equal(np.asarray(_nifti(_multipart(r2)[1]).dataobj), dose)
    other = next(c["id"] for c in meta["candidates"] if c["id"] != meta["chosen_id"])
    r3 = _infer(server, "dose", {"request_id": meta["request_id"], "candidate_id": other}, image="pt_201")
    assert not np.array_equal(np.asarray(_nifti(_multipart(r3)[1]).dataobj), dose)


def test_dose_on_client_sent_case_matches_datastore_case(server):
    sid = _session(server, _case_files("pt_202"))
    r = _infer(server, "dose", {"preview": True, "seed": 5}, session_id=sid)
    assert r.status_code == 200, r.text
    meta, image = _multipart(r)
    assert meta["case"]["source"] == "session" and meta["case"]["id"] == f"session-{sid}"
    ref = _infer(server, "dose", {"preview": True, "seed": 5}, image="pt_202")
    ref_meta, ref_image = _multipart(ref)
    a, b = _nifti(image), _nifti(ref_image)
    assert np.allclose(a.affine, b.affine)
    # same case, same seed, same model: the same dose whichever way the case arrived
    np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-4)


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped model in diffkt3d/weights/ (random tiny model here)")
def test_mean_dose_in_ptv70_near_prescription(server):
    r = _infer(server, "dose", {"steps": 10}, image="pt_201")
    meta, _ = _multipart(r)
    assert meta["dvh"]["PTV70"]["Dmean"] == pytest.approx(70.0, rel=0.10)


def test_server_stays_responsive_while_a_dose_is_computed(server):
    import threading

    out = {}

    def long_request():
        # long enough to still be running after 3 s even with the random tiny model
        out["r"] = _infer(server, "dose", {"steps": 6, "candidates": 2}, image="pt_202")

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(3.0)  # the dose request is now running in the server
    t0 = time.monotonic()
    assert requests.get(f"{server['url']}/diffkt3d/preferences", timeout=60).status_code == 200
    waited = time.monotonic() - t0
    busy = t.is_alive()
    t.join()
    assert out["r"].status_code == 200, out["r"].text[:300]
    assert busy, "the dose request finished before the probe: make it longer"
    assert waited < 2.0, f"a GET waited {waited:.1f} s behind a running inference"


# -- impute ------------------------------------------------------------------------------------------
def test_impute_ct_and_oar(server):
    r = _infer(server, "impute_ct", {"steps": 1}, image="pt_201")
    assert r.status_code == 200, r.text
    meta, image = _multipart(r)
    ct, ref = _nifti(image), nib.load(str(VALIDATION / "pt_201" / "ct.nii.gz"))
    assert ct.shape == ref.shape and np.allclose(ct.affine, ref.affine)
    assert np.asarray(ct.dataobj).dtype == np.float32
    for task in ("impute_oar", "impute_ptv"):
        r = _infer(server, task, {"steps": 1}, image="pt_201")
        assert r.status_code == 200, r.text
        meta, image = _multipart(r)
        labels_img = _nifti(image)
        labels = np.asarray(labels_img.dataobj)
        assert labels.shape == ref.shape and labels.dtype == np.uint8 and np.allclose(labels_img.affine, ref.affine)
        assert set(np.unique(labels)) <= {0, *meta["labels"].values()}
        for name, value in meta["labels"].items():  # merged voxels never exceed the structure's own count
            assert int((labels == value).sum()) <= meta["voxels"][name]
        target = task.split("_")[1]
        assert meta["quality"]["status"] == "experimental"
        assert meta["warnings"][0].startswith(f"{target} imputation is experimental")
        empty = sorted(n for n, v in meta["voxels"].items() if v == 0)
        assert sorted(w.split(":")[0] for w in meta["warnings"][1:]) == empty


def test_impute_returns_the_requested_structures_only(server):
    r = _infer(server, "impute_oar", {"steps": 1, "structures": ["SpinalCord", "Larynx"]}, image="pt_201")
    assert r.status_code == 200, r.text
    meta, _ = _multipart(r)
    assert list(meta["labels"]) == ["SpinalCord", "Larynx"] and list(meta["voxels"]) == ["SpinalCord", "Larynx"]
    r = _infer(server, "impute_oar", {"steps": 1, "structures": ["Heart"]}, image="pt_201")
    assert r.status_code == 422 and "cannot impute oar structure(s) ['Heart']" in r.text and "Mandible" in r.text
    r = _infer(server, "impute_ct", {"steps": 1, "structures": ["SpinalCord"]}, image="pt_201")
    assert r.status_code == 422 and "structures" in r.text  # a CT has no structures: an unknown parameter


# -- preferences and active learning ------------------------------------------------------------------
# The candidates the dose requests above served: pt_201 two from seed 3, pt_202 two from seed 0 (a
# preference must be about candidates the server served for the case, or say "external": true;
# monailabel_app/preference_routes.py).
SERVED_SEED = {"pt_201": 3, "pt_202": 0}


def _pref(case: str, rater: str) -> dict:
    s = SERVED_SEED[case]
    return {"case_id": case, "chosen_id": f"c1-seed{s + 1}", "rater": rater, "comment": "parotid",
            "candidates": [{"id": f"c0-seed{s}", "seed": s, "model_version": "m@1"},
                           {"id": f"c1-seed{s + 1}", "seed": s + 1, "model_version": "m@1"}]}


def test_preferences_write_read_and_strategy(server):
    url = server["url"]
    # pt_201 has stored candidate Scorecards (test_dose_on_datastore_case ran 2 candidates on it)
    r = requests.post(f"{url}/activelearning/preference", json={"rater": "dr_x"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "pt_201", r.text
    r = requests.post(f"{url}/diffkt3d/preferences", json=_pref("pt_201", "dr_x"), timeout=30)
    assert r.status_code == 201, r.text
    rec = r.json()["record"]
    assert rec["record_id"] and rec["time_utc"] and rec["schema_version"] == 1
    # pt_202's candidates were made elsewhere as far as this test knows: it says so
    requests.post(f"{url}/diffkt3d/preferences", json={**_pref("pt_202", "dr_y"), "external": True},
                  timeout=30).raise_for_status()
    got = requests.get(f"{url}/diffkt3d/preferences", params={"rater": "dr_x"}, timeout=30).json()
    assert got["count"] == 1 and got["records"][0]["record_id"] == rec["record_id"]
    assert requests.get(f"{url}/diffkt3d/preferences", timeout=30).json()["count"] == 2
    # the record is on disk, in the store file of the configured state dir
    lines = (server["root"] / "state" / "preferences" / "preferences.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["record_id"] == rec["record_id"]
    # dr_x has labelled pt_201 -> next is pt_202; dr_y labelled pt_202 -> still pt_201
    assert requests.post(f"{url}/activelearning/preference", json={"rater": "dr_x"}, timeout=60).json()["id"] == "pt_202"
    assert requests.post(f"{url}/activelearning/preference", json={"rater": "dr_y"}, timeout=60).json()["id"] == "pt_201"
    bad = requests.post(f"{url}/diffkt3d/preferences", json={**_pref("pt_201", "dr_x"), "chosen_id": "zz"}, timeout=30)
    assert bad.status_code == 422 and "chosen_id" in bad.json()["detail"]


# -- training -----------------------------------------------------------------------------------------
def _wait_training(url: str, timeout_s: float = 900) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            return status
        time.sleep(3)
    return status


@pytest.mark.slow
def test_short_scardnft_run_adds_a_version_that_too_few_cases_keep_from_service(server):
    """Two cases with a dose: one trains, one validates, and the rule wants three: the post-trained
    model is kept as a version with its figures, and the served model does not change."""
    from train_tasks.scardnft import ScardNFTTrainTask

    url = server["url"]
    if not ScardNFTTrainTask.available():
        r = requests.post(f"{url}/train/scardnft", json={}, timeout=30)
        assert r.status_code == 503 and "not available" in r.json()["detail"]
        return
    before = requests.get(f"{url}/info/", timeout=30).json()["diffkt3d"]
    params = {"iterations": 1, "group_size": 2, "sample_steps": 1, "inner_steps": 1, "lora_rank": 4,
              "lora_alpha": 4.0, "max_cpu_minutes": 10, "validation.steps": 1}
    # The server decides the base model (the served one): a client naming one is refused before training.
    r = requests.post(f"{url}/train/scardnft", json={**params, "base_model": "/etc/passwd"}, timeout=60)
    assert r.status_code == 422 and "base_model" in r.json()["detail"], r.text
    r = requests.post(f"{url}/train/scardnft", json=params, timeout=60)
    assert r.status_code == 200, r.text
    status = _wait_training(url)
    assert status.get("status") == "DONE", json.dumps(status)[-3000:]
    info = requests.get(f"{url}/info/", timeout=30).json()
    stats = info["train_stats"]["scardnft"]
    assert stats["status"] == "done" and stats["iterations"] == 1 and stats["base_model"] == "shipped"
    assert stats["promoted"] is False and "min_cases = 3" in stats["validation"]["reasons"][0], stats
    assert len(stats["validation"]["cases"]) == 1 and stats["validation"]["candidate_means"]["dose_score_gy"] > 0
    assert (server["root"] / "state" / "models" / "versions" / stats["version"] / "model.pt").is_file()
    # where the run lives, named inside the app's model folder, not as a path of the server's disk
    assert stats["run_dir"].startswith("scardnft/runs/") and stats["adapter"].startswith(stats["run_dir"] + "/")
    assert str(server["root"]) not in json.dumps(info["train_stats"])
    assert info["diffkt3d"]["model_version"] == before["model_version"]  # kept, not served
    assert info["diffkt3d"]["served_model"]["id"] == before["served_model"]["id"] == "shipped"


@pytest.mark.slow
def test_short_any2any_fine_tune_promoted_by_the_rule_serves_the_next_inference(server):
    url = server["url"]
    before = requests.get(f"{url}/info/", timeout=30).json()["diffkt3d"]["model_version"]
    # a fine-tune of the served model cannot change its architecture without from_scratch
    r = requests.post(f"{url}/train/any2any", json={"grid": 16}, timeout=60)
    assert r.status_code == 422 and "from_scratch" in r.json()["detail"], r.text
    accept = {"validation.rule.min_cases": 1, "validation.rule.dose_score_margin_gy": 1000.0,
              "validation.rule.dvh_score_margin_gy": 1000.0, "validation.rule.scorecard_margin_pct": 100.0}
    params = {"stages.any2any.steps": 1, "stages.dose.steps": 2, "stages.any2any.warmup_steps": 1,
              "stages.dose.warmup_steps": 1, "validation.steps": 1, **accept}
    r = requests.post(f"{url}/train/any2any", json=params, timeout=60)
    assert r.status_code == 200, r.text
    status = _wait_training(url)
    assert status.get("status") == "DONE", json.dumps(status)[-2000:]
    info = requests.get(f"{url}/info/", timeout=30).json()
    stats = info["train_stats"]["any2any"]
    assert stats["status"] == "done" and stats["from_scratch"] is False and stats["promoted"] is True, stats
    assert stats["run_dir"].startswith("any2any/runs/") and str(server["root"]) not in json.dumps(stats)
    served = info["diffkt3d"]["served_model"]
    assert served["id"] == stats["version"] and served["task"] == "any2any" and served["parent"] is not None
    # the promoted model takes over at the next request
    after = info["diffkt3d"]["model_version"]
    assert after != before
    r = _infer(server, "dose", {"preview": True}, image="pt_202")
    assert r.status_code == 200, r.text[:500]
    assert _multipart(r)[0]["model_version"] == after


# -- bad inputs ----------------------------------------------------------------------------------------
def _volume_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    buf = io.BytesIO()
    img = nib.Nifti1Image(array, affine)
    buf.write(gzip.compress(img.to_bytes()))
    return buf.getvalue()


def _check_4xx(r: requests.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    for w in words:
        assert w.lower() in detail.lower(), detail


@pytest.fixture(scope="module")
def small_case():
    """A 24^3 crop of pt_201 (CT, PTV70, Brainstem) as file bytes, to build bad uploads fast."""
    folder = VALIDATION / "pt_201"
    ct = nib.load(str(folder / "ct.nii.gz"))
    ptv = np.asarray(nib.load(str(folder / "PTV70.nii.gz")).dataobj) > 0.5
    c = np.argwhere(ptv).mean(axis=0).astype(int)
    sl = tuple(slice(max(0, ci - 12), max(0, ci - 12) + 24) for ci in c)
    arrays = {"ct.nii.gz": np.asarray(ct.dataobj)[sl].astype(np.int16),
              "PTV70.nii.gz": ptv[sl].astype(np.uint8),
              "Brainstem.nii.gz": (np.asarray(nib.load(str(folder / "Brainstem.nii.gz")).dataobj)[sl] > 0.5).astype(np.uint8)}
    return arrays, ct.affine


def test_bad_inputs_get_clear_4xx_and_server_keeps_serving(server, small_case):
    arrays, affine = small_case
    good = {n: _volume_bytes(a, affine) for n, a in arrays.items()}

    # missing CT: predicted as a missing condition, as by the CLI (DOSE_PREDICTION_INPUTS)
    sid = _session(server, {k: v for k, v in good.items() if k != "ct.nii.gz"})
    assert _infer(server, "dose", {"preview": True}, session_id=sid).status_code == 200
    # no target with a prescription
    sid = _session(server, {k: v for k, v in good.items() if not k.startswith("PTV")})
    _check_4xx(_infer(server, "dose", session_id=sid), 422, "target")
    # grid mismatch (one mask with another shape)
    sid = _session(server, {**good, "Brainstem.nii.gz": _volume_bytes(arrays["Brainstem.nii.gz"][:20], affine)})
    _check_4xx(_infer(server, "dose", session_id=sid), 422, "grid mismatch", "Brainstem")
    # empty PTV
    sid = _session(server, {**good, "PTV70.nii.gz": _volume_bytes(np.zeros_like(arrays["PTV70.nii.gz"]), affine)})
    _check_4xx(_infer(server, "dose", session_id=sid), 422, "PTV70", "empty")
    # NaN volume
    ct_nan = arrays["ct.nii.gz"].astype(np.float32)
    ct_nan[3, 4, 5] = np.nan
    sid = _session(server, {**good, "ct.nii.gz": _volume_bytes(ct_nan, affine)})
    _check_4xx(_infer(server, "dose", session_id=sid), 422, "nan")
    # truncated gzip: refused when it arrives, no session is made (monailabel_app/uploads.py)
    cut = {**good, "ct.nii.gz": good["ct.nii.gz"][: len(good["ct.nii.gz"]) // 2]}
    r = requests.put(f"{server['url']}/session/", files=[("files", (n, b)) for n, b in cut.items()], timeout=120)
    _check_4xx(r, 422, "ct.nii.gz", "truncated")
    # unknown task, unknown case id
    _check_4xx(_infer(server, "no_such_task", image="pt_201"), 404, "unknown infer task")
    _check_4xx(_infer(server, "dose", image="pt_999"), 404, "pt_999")
    # path-traversal-looking ids and file-system paths
    for bad in ("../pt_201", "..", "pt_201/../pt_202", "/etc/passwd", "..%2Fpt_201", "pt_201\\..\\x"):
        r = _infer(server, "dose", image=bad)
        assert r.status_code == 400, (bad, r.status_code, r.text[:300])
    # malformed params JSON
    r = requests.post(f"{server['url']}/infer/dose", params={"image": "pt_201"}, data={"params": "{steps: 1"}, timeout=60)
    _check_4xx(r, 400, "params", "json")
    # bad parameter values
    _check_4xx(_infer(server, "dose", {"steps": 0}, image="pt_201"), 422, "steps")
    _check_4xx(_infer(server, "dose", {"aggregate": "max"}, image="pt_201"), 422, "aggregate")
    # oversize upload (limit MAX_UPLOAD_MB): rejected before it is stored
    big = os.urandom((MAX_UPLOAD_MB + 1) * 2**20)
    r = requests.put(f"{server['url']}/session/", files=[("files", ("ct.nii.gz", big))], timeout=120)
    _check_4xx(r, 413, "upload limit")
    _assert_alive(server)
    # and a good request still works afterwards
    sid = _session(server, good)
    r = _infer(server, "dose", {"preview": True}, session_id=sid)
    assert r.status_code == 200, r.text[:500]
    assert server["proc"].poll() is None
