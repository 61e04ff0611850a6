"""A REAL MONAI Label server configured with `--conf ct_backbone prdit`.

`impute_ct` must run the PRDiT checkpoint given by `--conf prdit_model`, while dose and the other
imputations keep the Any2Any model. Random tiny checkpoints (shapes, grids and routing are what is
checked, not image quality).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from server_process import start_server, stop_server
from tiny_model import write_tiny_checkpoint, write_tiny_prdit_checkpoint

pytestmark = pytest.mark.server

VALIDATION = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation")
CASE = "pt_201"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (VALIDATION / CASE).is_dir():
        pytest.skip("OpenKBP validation cases not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("server-prdit")
    studies = root / "studies"
    shutil.copytree(VALIDATION / CASE, studies / CASE)
    prdit = write_tiny_prdit_checkpoint(root / "tiny-prdit.pt", grid=32)
    conf = {"model_dir": str(root / "model"), "state_dir": str(root / "state"), "device": "cpu",
            "ct_backbone": "prdit", "prdit_model": str(prdit), "prdit_k": "2"}
    env = {"DIFFKT3D_MODEL": str(write_tiny_checkpoint(root / "tiny.pt"))}
    try:
        proc, url = start_server(root, studies, conf, env, timeout_s=300)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"url": url}
    stop_server(proc)


def _infer(server, task: str, params: dict) -> tuple[dict, bytes]:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    r = requests.post(f"{server['url']}/infer/{task}", params={"output": "all", "image": CASE},
                      data={"params": json.dumps(params)}, timeout=600)
    assert r.status_code == 200, r.text
    parts = {}
    for part in MultipartDecoder.from_response(r).parts:
        name = part.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]
        parts[name] = part.content
    return json.loads(parts["params"]), parts["image"]


def test_impute_ct_runs_prdit_and_other_tasks_keep_any2any(server):
    info = requests.get(f"{server['url']}/info/", timeout=60).json()["diffkt3d"]
    assert info["ct_backbone"] == "prdit"
    assert info["ct_model_version"].startswith("prdit:tiny-prdit@")
    assert info["model_version"] and not info["model_version"].startswith("prdit:")

    meta, image = _infer(server, "impute_ct", {"steps": 2, "seed": 3})
    assert meta["model_version"] == info["ct_model_version"] and meta["steps"] == 2 and meta["seed"] == 3
    ct = nib.Nifti1Image.from_bytes(gzip.decompress(image))
    ref = nib.load(str(VALIDATION / CASE / "ct.nii.gz"))
    assert ct.shape == ref.shape and np.allclose(ct.affine, ref.affine)
    values = np.asarray(ct.dataobj)
    assert values.dtype == np.float32 and values.min() >= -1000 and values.max() <= 1000
    assert (values == -1000).mean() > 0.3  # air outside the body mask
    assert values[values > -1000].std() > 0

    meta, _ = _infer(server, "impute_oar", {"steps": 1})
    assert meta["model_version"] == info["model_version"]


def test_a_prdit_imputation_reports_its_steps_as_a_job(server):
    """The PRDiT backbone calls the same step hook: its job ends at the request's step count."""
    import uuid

    job_id = uuid.uuid4().hex
    meta, _ = _infer(server, "impute_ct", {"steps": 3, "job_id": job_id})
    assert meta["model_version"].startswith("prdit:")
    job = requests.get(f"{server['url']}/diffkt3d/jobs/{job_id}", timeout=30).json()
    assert job["task"] == "impute_ct" and job["state"] == "done" and job["step"] == job["total_steps"] == 3, job
