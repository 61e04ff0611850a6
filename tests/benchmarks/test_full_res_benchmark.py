"""benchmarks/full_res.py with tiny stages on two small synthetic cases (OpenKBP structure names):
every variant, figure and paired test. A 128^3 OpenKBP case costs a minute per variant on a busy
CPU, which is the benchmark's job, not a unit test's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import full_res as bench  # noqa: E402

from diffkt3d.data.encoding import EncodingConfig  # noqa: E402
from diffkt3d.data.synthetic import make_synthetic_case  # noqa: E402
from diffkt3d.io.case_folder import save_case_folder  # noqa: E402
from diffkt3d.models.any2any_dit import Any2AnyDiT  # noqa: E402
from diffkt3d.models.checkpoint import load_checkpoint, save_checkpoint, write_full_res_stages  # noqa: E402
from diffkt3d.models.config import get_config  # noqa: E402
from diffkt3d.models.full_res import FullResConfig, FullResStage  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, and the base + a random stage for oar and dose, with and without coarse input."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bench")
    enc = EncodingConfig(grid=(16, 16, 16), modalities=("ct", "ptv", "oar", "body", "dose"))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities))
    base = save_checkpoint(folder / "base.pt", Any2AnyDiT(cfg), cfg, enc, flow_shift=3.0, meta={"name": "b"})
    out = {}
    for name, coarse in (("model", True), ("peer", False)):
        stages = {}
        for target in ("oar", "dose"):
            config = FullResConfig(target=target, features=(4, 4, 8, 8, 16, 4), crop=(32, 32, 32),
                                   coarse_input=coarse).resolved(enc.modalities)
            stages[target] = (config, FullResStage(config, load_checkpoint(base).encoding).state_dict())
        out[name] = write_full_res_stages(base, folder / f"{name}.pt", stages)
    for seed in (0, 1):
        save_case_folder(make_synthetic_case(case_id=f"pt_{seed}", seed=seed), folder / "cases" / f"pt_{seed}")
    out["cases"] = folder / "cases"
    return out


@pytest.mark.parametrize("target, figure", [("oar", "dice/SpinalCord"), ("dose", "dvh_score")])
def test_benchmark_writes_figures_and_paired_tests(models, tmp_path, target, figure):
    out = tmp_path / f"full_res_{target}"
    bench.main(["--target", target, "--model", str(models["model"]), "--peer", str(models["peer"]),
                "--cases", str(models["cases"]), "--limit", "2", "--steps", "1", "--threads", "1",
                "--out", str(out)])
    blob = json.loads(out.with_suffix(".json").read_text())
    assert "machine" in blob and "date" in blob and sorted(blob["rows"]) == ["base", "model", "peer"]
    assert all(len(rows) == 2 for rows in blob["rows"].values())
    assert figure in blob["summary"]["model"] and figure in blob["paired"]["model_vs_peer"]
    assert blob["paired"]["model_vs_peer"][figure]["n"] == 2
    assert "Paired Wilcoxon" in out.with_suffix(".md").read_text()


def test_a_peer_that_reads_the_coarse_prediction_is_refused(models, tmp_path):
    with pytest.raises(SystemExit, match="a peer is trained with stage.coarse_input: false"):
        bench.main(["--target", "oar", "--model", str(models["model"]), "--peer", str(models["model"]),
                    "--cases", str(models["cases"]), "--limit", "1", "--steps", "1", "--threads", "1",
                    "--variants", "peer", "--out", str(tmp_path / "x")])


def test_paired_test_direction_follows_the_figure():
    model = [{"case": "a", "dice/X": 0.9, "hd95_mm/X": 2.0}, {"case": "b", "dice/X": 0.0, "hd95_mm/X": 3.0}]
    peer = [{"case": "a", "dice/X": 0.5, "hd95_mm/X": 4.0}, {"case": "b", "dice/X": 0.1, "hd95_mm/X": float("nan")}]
    dice = bench.paired_test(model, peer, "dice/X")
    assert dice["n"] == 2 and dice["a_better"] == 1 and dice["higher_is_better"]
    hd = bench.paired_test(model, peer, "hd95_mm/X")
    assert hd["n"] == 1 and hd["a_better"] == 1 and not hd["higher_is_better"]


def test_inputs_come_from_a_folder_without_the_targets_files(models, tmp_path):
    from diffkt3d.io.case_folder import load_case_folder

    folder = models["cases"] / "pt_0"
    case = load_case_folder(folder)
    for target, gone in (("oar", set(case.oars)), ("ptv", set(case.targets))):
        inp = load_case_folder(bench.held_out_folder(folder, case, target, tmp_path / target))
        assert gone and not gone & set(inp.structures) and inp.ct_hu is not None
        assert set(inp.structures) == set(case.structures) - gone
    ct = load_case_folder(bench.held_out_folder(folder, case, "ct", tmp_path / "ct"))
    assert ct.ct_hu is None and set(ct.structures) == set(case.structures)


def test_record_quality_writes_the_oar_figures_into_the_model(models, tmp_path):
    import shutil

    from diffkt3d.inference.quality import target_quality
    from diffkt3d.models.checkpoint import read_checkpoint

    model = tmp_path / "model.pt"
    shutil.copy(models["model"], model)
    cases = tmp_path / "cases"
    shutil.copytree(models["cases"], cases)
    (cases / "pt_1" / "ct.nii.gz").unlink()  # a case without CT: scored, and set apart in the report
    out = tmp_path / "full_res_oar"
    bench.main(["--target", "oar", "--model", str(model), "--peer", str(models["peer"]), "--cases", str(cases),
                "--steps", "1", "--threads", "1", "--variants", "model", "peer", "--record-quality",
                "--out", str(out)])
    blob = json.loads(out.with_suffix(".json").read_text())
    rows = blob["rows"]["model"]
    assert [r["has_ct"] for r in rows] == [True, False]
    assert blob["summary_with_ct"]["model"]["mean_dice (n)"] == 1
    assert "cases that have a CT" in out.with_suffix(".md").read_text()
    record = read_checkpoint(model)["meta"]["quality"]["oar"]
    pooled = [r[k] for r in rows for k in r if k.startswith("dice/")]
    assert record["cases"] == 2 and record["benchmark"] == "full_res_oar.md"
    assert abs(record["figures"]["mean_dice"] - sum(pooled) / len(pooled)) < 1e-4
    assert set(record["figures"]["dice"]) == {k.split("/", 1)[1] for r in rows for k in r if k.startswith("dice/")}
    quality = target_quality(read_checkpoint(model)["meta"], "oar")
    assert quality.status == "experimental" and "at least 20 are needed" in quality.reason


def test_record_quality_needs_an_imputation_target(models, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--target", "dose", "--model", str(models["model"]), "--peer", str(models["peer"]),
                    "--cases", str(models["cases"]), "--record-quality", "--out", str(tmp_path / "x")])


def test_baselines_are_fitted_on_training_cases_and_only_for_ct_and_ptv(models, capsys):
    from diffkt3d.io.case_folder import load_case_folder

    run_ptv, info = bench.fit_baseline("ptv", str(models["cases"]), 2)
    assert info["cases"] == 2 and info["name"].startswith("PTV70 atlas")
    case = load_case_folder(models["cases"] / "pt_0")
    masks = run_ptv(case)
    assert list(masks) == ["PTV70"] and masks["PTV70"].shape == case.grid.shape and masks["PTV70"].any()
    run_ct, info = bench.fit_baseline("ct", str(models["cases"]), 2)
    ct = run_ct(case)
    assert info["name"] == "label-mean CT" and (ct[~case.body] == -1000).all()
    with pytest.raises(SystemExit):
        bench.main(["--target", "oar", "--model", str(models["model"]), "--peer", str(models["peer"]),
                    "--variants", "baseline"])
    assert "the baseline variant is for ct and ptv, not oar" in capsys.readouterr().err
