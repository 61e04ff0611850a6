"""App layers without a server: case-folder datastore, preference strategy, request parsing (fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")

from diffkt3d.errors import CaseError
from diffkt3d.preferences import PreferenceRecord, PreferenceStore
from infer_tasks.common import TaskError, load_request_case
from infer_tasks.dose import CandidateCache, DoseParams
from monailabel_app.datastore import CaseFolderDatastore, UnknownCaseError
from monailabel_app.strategy import PreferenceStrategy, record_candidates

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _write_case(folder: Path, with_dose: bool = True) -> Path:
    folder.mkdir(parents=True)
    shape = (12, 10, 8)
    ct = np.full(shape, -200, dtype=np.int16)
    ptv = np.zeros(shape, dtype=np.uint8)
    ptv[4:8, 3:7, 2:6] = 1
    cord = np.zeros(shape, dtype=np.uint8)
    cord[1:3, 1:3, :] = 1
    nib.save(nib.Nifti1Image(ct, AFFINE), str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(ptv, AFFINE), str(folder / "PTV70.nii.gz"))
    nib.save(nib.Nifti1Image(cord, AFFINE), str(folder / "SpinalCord.nii.gz"))
    if with_dose:
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), AFFINE), str(folder / "dose.nii.gz"))
    return folder


@pytest.fixture
def studies(tmp_path):
    root = tmp_path / "studies"
    _write_case(root / "case_a")
    _write_case(root / "case_b", with_dose=False)
    _write_case(root / "case_c")
    (root / ".hidden").mkdir()
    (root / "not_a_case").mkdir()
    return root


# -- datastore --------------------------------------------------------------------------------------
def test_datastore_lists_case_folders_and_labels(studies):
    ds = CaseFolderDatastore(studies)
    assert ds.list_images() == ["case_a", "case_b", "case_c"]
    assert ds.get_labeled_images() == ["case_a", "case_c"]
    assert ds.get_unlabeled_images() == ["case_b"]
    # listings clients can read carry ids, never where the studies live on the server
    assert ds.datalist() == [{"image": "case_a", "label": "case_a"}, {"image": "case_c", "label": "case_c"}]
    listing = ds.json()
    assert listing["case_a"]["image"] == {"id": "case_a"} and listing["case_a"]["labels"] == {"final": "case_a"}
    assert str(studies) not in json.dumps([listing, ds.datalist(), ds.get_image_info("case_a")])
    assert ds.status()["total"] == 3 and ds.status()["completed"] == 2
    assert Path(ds.get_image_uri("case_a")) == studies / "case_a"


@pytest.mark.parametrize("bad", ["../case_a", "..", "case_a/../case_b", "/etc", "a\\b", "", ".hidden"])
def test_datastore_rejects_path_like_ids(studies, bad):
    ds = CaseFolderDatastore(studies)
    with pytest.raises(ValueError, match="not a valid id"):
        ds.get_image_uri(bad)


def test_datastore_unknown_case_and_symlink_escape(studies, tmp_path):
    outside = _write_case(tmp_path / "outside")
    (studies / "link").symlink_to(outside)
    ds = CaseFolderDatastore(studies)
    with pytest.raises(UnknownCaseError):
        ds.get_image_uri("nope")
    with pytest.raises(UnknownCaseError):  # a symlinked folder pointing outside the studies dir
        ds.get_image_uri("link")


def test_datastore_info_is_kept_outside_case_folders(studies):
    ds = CaseFolderDatastore(studies)
    before = sorted(p.name for p in (studies / "case_a").iterdir())
    ds.update_image_info("case_a", {"x": 1})
    ds.update_image_info("case_a", {"y": 2})
    assert ds.get_image_info("case_a")["x"] == 1 and ds.get_image_info("case_a")["y"] == 2
    assert sorted(p.name for p in (studies / "case_a").iterdir()) == before


def test_datastore_add_image_from_archive(studies, tmp_path):
    src = _write_case(tmp_path / "wrapped" / "inner", with_dose=False)
    archive = shutil.make_archive(str(tmp_path / "case"), "zip", src.parent)
    ds = CaseFolderDatastore(studies)
    ds.add_image("case_new", archive, {})
    assert "case_new" in ds.list_images()
    assert (studies / "case_new" / "PTV70.nii.gz").exists()


# -- request case loading --------------------------------------------------------------------------------
def test_session_case_errors_name_case_and_file_without_server_paths(tmp_path):
    folder = _write_case(tmp_path / "sess" / "tmpabc", with_dose=False)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), AFFINE), str(folder / "Larynx.nii.gz"))
    req = {"image": str(folder), "diffkt3d_source": "session", "diffkt3d_case_id": "session-1"}
    with pytest.raises(CaseError) as exc:
        load_request_case(req, max_upload_bytes=10**9)
    msg = str(exc.value)
    assert "session-1" in msg and "Larynx.nii.gz" in msg and "grid mismatch" in msg
    assert str(tmp_path) not in msg
    with pytest.raises(TaskError) as too_big:
        load_request_case(req, max_upload_bytes=100)
    assert too_big.value.status == 413


# -- parameters and candidate cache ----------------------------------------------------------------------
def test_dose_params_parse_and_reject():
    p = DoseParams.from_request({"steps": "5", "candidates": 3, "preview": "true", "model": "dose"})
    assert (p.steps, p.candidates, p.preview, p.aggregate) == (5, 3, True, "best")
    for bad, word in [({"steps": 0}, "steps"), ({"candidates": 99}, "candidates"), ({"aggregate": "max"}, "aggregate"),
                      ({"preview": "maybe"}, "preview"), ({"seed": -1}, "seed"), ({"request_id": "x"}, "candidate_id")]:
        with pytest.raises(TaskError, match=word):
            DoseParams.from_request(bad)


def test_dose_template_is_a_shipped_name_or_request_yaml_never_a_server_path(tmp_path):
    from diffkt3d.scorecard import load_template

    secret = tmp_path / "secret.yaml"
    secret.write_text("items: [{id: leaked-content}]\n")
    for name in (str(secret), str(tmp_path / "missing.yaml"), "../../etc/passwd", "secret"):
        with pytest.raises(TaskError) as err:
            DoseParams.from_request({"template": name})
        # the same answer whether the file exists or not, and never its content
        assert err.value.status == 422 and "must name a shipped Scorecard template" in str(err.value)
        assert "leaked-content" not in str(err.value) and "does not exist" not in str(err.value)
    shipped = load_template("openkbp_hn")
    yaml_text = Path(shipped.path).read_text()
    p = DoseParams.from_request({"template_yaml": yaml_text})
    assert p.scorecard is not None and p.scorecard.items == shipped.items and p.template == shipped.name
    for bad, status, word in [({"template_yaml": "items: [1"}, 422, "not valid YAML"),
                              ({"template_yaml": "items: []"}, 422, "'items' must be a non-empty list"),
                              ({"template_yaml": 5}, 422, "YAML text"),
                              ({"template_yaml": "#" * 70_000}, 413, "limit"),
                              ({"template_yaml": yaml_text, "template": "openkbp_hn"}, 422, "not both")]:
        with pytest.raises(TaskError, match=word) as err:
            DoseParams.from_request(bad)
        assert err.value.status == status


def test_integer_parameters_refuse_odd_text_with_a_422():
    from infer_tasks.common import check_param_keys, int_param

    for value in ("²", "1" * 5000, "1.5", 2.5, True, None, [3]):
        with pytest.raises(TaskError, match="'steps' must be an integer in") as err:
            int_param({"steps": value}, "steps", 10, 1, 100)
        assert len(str(err.value)) < 300  # the value is named, not echoed at length
    assert int_param({"steps": " 7 "}, "steps", 10, 1, 100) == 7
    with pytest.raises(TaskError, match=r"unknown parameter\(s\) \['step'\]; known parameters: \['seed', 'steps'\]"):
        check_param_keys({"model": "impute_ct", "image": "x", "step": 3}, frozenset({"steps", "seed"}), "impute_ct")


def test_candidate_cache_evicts_oldest_by_bytes():
    from diffkt3d.data.case import Grid

    grid = Grid((10, 10, 10), np.eye(4))
    cache = CandidateCache(max_bytes=2 * 4000 + 10)
    for k in range(3):
        cache.put(f"r{k}", grid, {"c0": np.full((10, 10, 10), k, np.float32)}, {})
    with pytest.raises(TaskError):
        cache.get("r0", "c0")
    assert float(cache.get("r2", "c0")[1][0, 0, 0]) == 2.0
    with pytest.raises(TaskError, match="no candidate"):
        cache.get("r2", "c9")


# -- strategy -------------------------------------------------------------------------------------------
def _cands(totals):
    return {"request_id": "r", "model_version": "m", "template": "t",
            "candidates": [{"id": f"c{k}", "seed": k, "scorecard_total": t} for k, t in enumerate(totals)]}


def test_strategy_picks_largest_spread_and_skips_labelled(studies, tmp_path):
    ds = CaseFolderDatastore(studies)
    store = PreferenceStore(tmp_path / "prefs")
    strategy = PreferenceStrategy(store)
    assert strategy({"rater": "r1"}, ds)["id"] == "case_a"  # nothing scored yet: first case
    record_candidates(ds, "case_a", _cands([80.0, 81.0]))
    record_candidates(ds, "case_c", _cands([70.0, 78.0, 75.0]))
    res = strategy({"rater": "r1"}, ds)
    assert res["id"] == "case_c" and res["score"] == pytest.approx(8.0)
    store.append(PreferenceRecord.from_dict({"case_id": "case_c", "chosen_id": "c0", "rater": "r1",
                                             "candidates": [{"id": "c0", "seed": 0, "model_version": "m"},
                                                            {"id": "c1", "seed": 1, "model_version": "m"}]}, new=True))
    assert strategy({"rater": "r1"}, ds)["id"] == "case_a"  # r1 labelled case_c
    assert strategy({"rater": "r2"}, ds)["id"] == "case_c"  # r2 did not
    for case in ("case_a", "case_b"):
        store.append(PreferenceRecord.from_dict({"case_id": case, "chosen_id": "c0", "rater": "r1",
                                                 "candidates": [{"id": "c0", "seed": 0, "model_version": "m"},
                                                                {"id": "c1", "seed": 1, "model_version": "m"}]},
                                                new=True))
    assert strategy({"rater": "r1"}, ds) == {}


# -- routes (in-process FastAPI app, no server) ----------------------------------------------------------
def test_routes_preferences_upload_limit_and_unavailable_trainer(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from diffkt3d.audit import AuditLog
    from diffkt3d.preferences import ServedCandidates
    from monailabel_app.preference_routes import Provenance
    from monailabel_app.routes import install

    api = FastAPI()
    store = PreferenceStore(tmp_path / "prefs")
    audit = AuditLog(tmp_path / "audit")
    served = ServedCandidates(tmp_path / "prefs")
    served.add("case_a", "r1", ["c0", "c1"])
    install(api, store, audit, max_upload_bytes=4000, unavailable_trainers={"scardnft": "not in this build"},
            threaded_infer=False, provenance=Provenance(served, has_case=lambda case_id: case_id == "case_a"))
    client = TestClient(api)
    rec = {"case_id": "case_a", "chosen_id": "c0", "rater": "r1",
           "candidates": [{"id": "c0", "seed": 0, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}]}
    r = client.post("/diffkt3d/preferences", json=rec)
    assert r.status_code == 201 and len(store.read().records) == 1
    assert client.get("/diffkt3d/preferences", params={"rater": "r1"}).json()["count"] == 1
    assert client.get("/diffkt3d/preferences", params={"rater": "r2"}).json()["count"] == 0
    r = client.post("/diffkt3d/preferences", json={**rec, "comment": "x" * 5000})  # body > 4000 bytes
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    assert len(store.read().records) == 1
    r = client.post("/diffkt3d/preferences", json={**rec, "rater": ""})
    assert r.status_code == 422 and "rater" in r.json()["detail"]
    r = client.post("/train/scardnft", json={})
    assert r.status_code == 503 and r.json()["detail"] == "not in this build"
    # auth off: writes are still audited, as "anonymous" (the 413 is answered before auth and audit)
    entries, _ = audit.read()
    assert [(e.user, e.action, e.status) for e in entries] == [
        ("anonymous", "preference.record", 201), ("anonymous", "preference.record", 422),
        ("anonymous", "train.start", 503)]
    assert entries[0].details["case_id"] == "case_a"


@pytest.mark.slow
def test_any2any_task_trains_on_two_processes_through_torchrun(tmp_path, tiny_checkpoint):
    """The train task's several-GPU path (DDP via torchrun), exercised with gloo on 2 CPU processes:
    it fine-tunes the served model as the one-process path does."""
    from diffkt3d.data.synthetic import make_synthetic_case
    from diffkt3d.io.case_folder import save_case_folder
    from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint
    from diffkt3d.models.registry import ModelRegistry
    from train_tasks.any2any import Any2AnyTrainTask, train_config_from_request

    dirs = [str(save_case_folder(make_synthetic_case(case_id=f"c{i}", seed=i), tmp_path / "cases" / f"c{i}"))
            for i in range(2)]
    request = {"stages.any2any.steps": 2, "stages.dose.steps": 2, "gpus": 2}
    task = Any2AnyTrainTask(tmp_path / "model", ModelRegistry(tmp_path / "reg", None), lambda: tiny_checkpoint)
    run_dir = tmp_path / "run"
    cfg = train_config_from_request(request, dirs, run_dir, tmp_path / "cache", base_model=tiny_checkpoint)
    final = task._run_distributed(cfg, run_dir, nproc=2)
    assert final.exists()
    assert load_checkpoint(final).meta["global_step"] == 4
    assert read_checkpoint(final)["model_config"] == read_checkpoint(tiny_checkpoint)["model_config"]


def test_gpus_request_field_maps_to_training_processes():
    import torch

    from diffkt3d.errors import DiffKT3DError
    from train_tasks.any2any import processes_for_gpus

    assert processes_for_gpus("all") == (max(1, torch.cuda.device_count()), None)
    assert processes_for_gpus(None) == (max(1, torch.cuda.device_count()), None)
    assert processes_for_gpus("0,2") == (2, "0,2")
    assert processes_for_gpus(3) == (3, None)
    with pytest.raises(DiffKT3DError, match="gpus"):
        processes_for_gpus("many")


def test_dose_task_keeps_only_multi_candidate_results(tmp_path, tiny_checkpoint):
    """A preview (one candidate) is the response image: keeping it would pin 8 MB per request on a
    128^3 case until the cache budget is full (the soak benchmark's RSS growth)."""
    from infer_tasks.common import CASE_ID_KEY, SOURCE_KEY, ModelProvider
    from infer_tasks.dose import DoseTask

    task = DoseTask(ModelProvider(tiny_checkpoint, None, None, "cpu"), max_upload_bytes=10**9)
    request = {"image": str(_write_case(tmp_path / "case_a", with_dose=False)), SOURCE_KEY: "datastore",
               CASE_ID_KEY: "case_a"}
    for _ in range(3):
        out, preview = task({**request, "preview": True})
        Path(out).unlink()  # the server deletes the response file once sent
    assert len(task.cache._items) == 0
    with pytest.raises(TaskError, match="single-candidate results are not kept"):
        task({**request, "request_id": preview["request_id"], "candidate_id": preview["chosen_id"]})
    out, multi = task({**request, "preview": True, "candidates": 2, "seed": 4})
    Path(out).unlink()
    assert len(task.cache._items) == 1
    other = next(c["id"] for c in multi["candidates"] if c["id"] != multi["chosen_id"])
    path, meta = task({**request, "request_id": multi["request_id"], "candidate_id": other})
    assert meta["candidate_id"] == other and nib.load(path).shape == (12, 10, 8)
    Path(path).unlink()


def test_dose_answer_feeds_the_preference_strategy(studies, tiny_checkpoint):
    """The strategy stores what the dose task answers (the core's dose result): same totals, request, template."""
    from diffkt3d.constants import DEFAULT_TEMPLATE
    from infer_tasks.common import CASE_ID_KEY, SOURCE_KEY, ModelProvider
    from infer_tasks.dose import DoseTask
    from monailabel_app.strategy import INFO_KEY

    ds = CaseFolderDatastore(studies)
    task = DoseTask(ModelProvider(tiny_checkpoint, None, None, "cpu"), max_upload_bytes=10**9,
                    on_candidates=lambda case_id, source, result: record_candidates(ds, case_id, result))
    out, answer = task({"image": str(studies / "case_a"), SOURCE_KEY: "datastore", CASE_ID_KEY: "case_a",
                        "preview": True, "candidates": 2, "seed": 1})
    Path(out).unlink()
    info = ds.get_image_info("case_a")[INFO_KEY]
    assert info["totals"] == [c["scorecard_total"] for c in answer["candidates"]]
    assert info["seeds"] == [1, 2] and info["request_id"] == answer["request_id"]
    assert info["template"] == answer["template"] == DEFAULT_TEMPLATE
