"""The preference -> ScardNFT -> validated model loop on a REAL server, over HTTP.

A simulated rater who always prefers the candidate with the lower spinal-cord dose labels the
server's candidates through the preference API; `POST /train/scardnft` runs on a tiny budget. A
candidate ruined by its learning rate is validated, kept and not served (the served doses stay
bit-identical); with a rule that accepts, the next candidate is served, then rolled back to the
shipped model by an administrator's promotion.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from server_process import start_server, stop_server
from tiny_model import write_tiny_checkpoint

from diffkt3d.inference import default_model_path

pytestmark = [pytest.mark.server, pytest.mark.slow]

VALIDATION = Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation"
CASES = ("pt_201", "pt_202", "pt_203", "pt_204")
CORD_ITEM = "cord_d01cc"  # Scorecard item: spinal cord D0.1cc (Gy)
# A tiny ScardNFT run, two held-out cases and a rule that may decide on two.
TINY = {"iterations": 1, "group_size": 2, "sample_steps": 1, "inner_steps": 1, "lora_rank": 4, "lora_alpha": 4.0,
        "max_cpu_minutes": 10, "min_preferences": 2, "validation.holdout_cases": 2, "validation.rule.min_cases": 2,
        "validation.steps": 2}
ACCEPT_ANY = {"validation.rule.dose_score_margin_gy": 1000.0, "validation.rule.dvh_score_margin_gy": 1000.0,
              "validation.rule.scorecard_margin_pct": 100.0, "validation.rule.preference_margin_pct": 100.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not all((VALIDATION / c).is_dir() for c in CASES):
        pytest.skip("OpenKBP validation cases not available")
    pytest.importorskip("peft", reason="ScardNFT needs peft (requirements-server.txt)")
    root = tmp_path_factory.mktemp("lifecycle")
    studies = root / "studies"
    for c in CASES:
        shutil.copytree(VALIDATION / c, studies / c)
    env = {} if default_model_path().is_file() else {"DIFFKT3D_MODEL": str(write_tiny_checkpoint(root / "tiny.pt"))}
    conf = {"model_dir": str(root / "model"), "state_dir": str(root / "state"), "device": "cpu"}
    try:
        proc, url = start_server(root, studies, conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"url": url, "root": root}
    stop_server(proc)


def _dose(url: str, case: str, params: dict, output: str) -> requests.Response:
    r = requests.post(f"{url}/infer/dose", params={"image": case, "output": output},
                      data={"params": json.dumps(params)}, timeout=600)
    assert r.status_code == 200, r.text[:500]
    return r


def _served_dose(url: str) -> tuple[bytes, str]:
    """Voxels of the served model's dose for pt_201 (fixed seed) and the model version that made it."""
    r = _dose(url, "pt_201", {"steps": 2, "candidates": 1, "seed": 5}, "all")
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p.content
             for p in MultipartDecoder.from_response(r).parts}
    image = nib.Nifti1Image.from_bytes(gzip.decompress(parts["image"]))
    return np.asarray(image.dataobj).tobytes(), json.loads(parts["params"])["model_version"]


def _cord(candidate: dict) -> float:
    return next(i["value"] for i in candidate["scorecard"]["items"] if i["id"] == CORD_ITEM)


def _rate_every_case(url: str) -> int:
    """The simulated rater: for each case, two candidates, the one with the lower cord dose is chosen."""
    for k, case in enumerate(CASES):
        result = _dose(url, case, {"steps": 2, "candidates": 2, "seed": 10 * k}, "json").json()
        cands = result["candidates"]
        chosen = min(cands, key=_cord)
        record = {"case_id": case, "chosen_id": chosen["id"], "rater": "sim.cord",
                  "comment": "lower spinal cord dose",
                  "candidates": [{"id": c["id"], "seed": c["seed"], "model_version": result["model_version"],
                                  "scorecard_items": c["scorecard_items"]} for c in cands]}
        r = requests.post(f"{url}/diffkt3d/preferences", json=record, timeout=30)
        assert r.status_code == 201, r.text
    return len(CASES)


def _train(url: str, params: dict, timeout_s: float = 1500) -> dict:
    r = requests.post(f"{url}/train/scardnft", json=params, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(3)
    assert status.get("status") == "DONE", json.dumps(status)[-3000:]
    return requests.get(f"{url}/info/", timeout=30).json()


def test_preference_loop_validates_keeps_a_ruined_candidate_promotes_and_rolls_back(server):
    url = server["url"]
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["diffkt3d"]["served_model"]["id"] == "shipped"
    before, shipped_version = _served_dose(url)
    assert _rate_every_case(url) == 4

    # 1. a learning rate that ruins the model: validated, kept as a version, not served
    info = _train(url, {**TINY, "lr": 1000.0})
    stats = info["train_stats"]["scardnft"]
    assert stats["status"] == "done" and stats["promoted"] is False and stats["parent"] == "shipped", stats
    ruined = stats["version"]
    validation = stats["validation"]
    assert validation["decision"] == "keep" and validation["reasons"] and len(validation["cases"]) == 2
    assert validation["reference_version"] == "shipped"
    assert stats["item_weights"], "the cord-preferring rater's records were learned from"
    assert "preference_scorecard_pct" in validation["candidate_means"]
    assert info["diffkt3d"]["served_model"]["id"] == "shipped"
    after, version = _served_dose(url)
    assert after == before and version == shipped_version  # bit-identical: nothing was promoted

    # 2. a rule that accepts: the candidate is validated and served from the next request
    info = _train(url, {**TINY, **ACCEPT_ANY})
    stats = info["train_stats"]["scardnft"]
    assert stats["promoted"] is True and stats["validation"]["decision"] == "promote", stats
    accepted = stats["version"]
    served = info["diffkt3d"]["served_model"]
    assert served["id"] == accepted and served["parent"] == "shipped" and served["by"] == "validation-rule"
    assert served["validation"]["decision"] == "promote"
    assert set(served["validation"]["paired_mean_difference"]) == {
        "dose_score_gy", "dvh_score_gy", "scorecard_pct", "preference_scorecard_pct"}
    assert _served_dose(url)[1] != shipped_version

    # every version with its parent, data and figures
    listing = requests.get(f"{url}/diffkt3d/models", timeout=30).json()
    assert [v["id"] for v in listing["versions"]] == ["shipped", ruined, accepted]
    assert [v["served"] for v in listing["versions"]] == [False, False, True]
    detail = requests.get(f"{url}/diffkt3d/models/{ruined}", timeout=30).json()
    assert detail["parent"] == "shipped" and detail["recipe"]["lr"] == 1000.0
    assert sorted(detail["data"]["train"] + detail["data"]["validation"]) == list(CASES)
    assert not set(detail["data"]["train"]) & set(detail["data"]["validation"])
    assert len(detail["validation"]["candidate"]) == 2 and "base_model" not in detail["recipe"]

    # 3. roll back to the shipped model: the doses are the shipped model's again, bit for bit
    r = requests.post(f"{url}/diffkt3d/models/shipped/promote", json={"reason": "rollback test"}, timeout=30)
    assert r.status_code == 200 and r.json()["previous"] == accepted, r.text
    assert requests.get(f"{url}/info/", timeout=30).json()["diffkt3d"]["served_model"]["id"] == "shipped"
    assert _served_dose(url) == (before, shipped_version)
    r = requests.post(f"{url}/diffkt3d/models/v99-any2any/promote", json={}, timeout=30)
    assert r.status_code == 404 and ruined in r.json()["detail"]

    # the audit trail has each decision and who changed the served model
    entries = requests.get(f"{url}/diffkt3d/audit", timeout=30).json()["entries"]
    validated = [e["details"] for e in entries if e["action"] == "model.validate"]
    assert [(d["version"], d["decision"]) for d in validated] == [(ruined, "keep"), (accepted, "promote")]
    promoted = [(e["user"], e["details"].get("version"), e["status"]) for e in entries
                if e["action"] == "model.promote"]
    assert promoted == [("training-run", accepted, 200), ("anonymous", "shipped", 200),
                        ("anonymous", "v99-any2any", 404)]
