"""PRDiT trainer: CT-imputation data from case folders (synthetic folder on disk) and two stages."""

import numpy as np
import pytest
import torch

from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.models.prdit import PRDiT, get_config
from diffkt3d.training.prdit_trainer import (
    StageSettings,
    config_for_ct_imputation,
    load_ct_imputation_data,
    paper_stage2_lr,
    train_two_stage,
)

torch.set_num_threads(1)


def _case(tmp_path, name, with_ct=True):
    shape = (16, 16, 16)
    body = np.zeros(shape, bool)
    body[2:14, 3:13, 2:14] = True
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    ct[6:9, 6:9, 6:9] = 1500.0  # clipped to the 1000 HU window
    ptv = np.zeros(shape, bool)
    ptv[5:9, 5:9, 5:9] = True
    cord = np.zeros(shape, bool)
    cord[10:12, 6:8, 2:14] = True
    case = Case(case_id=name, grid=Grid(shape, np.diag([2.0, 2.0, 2.0, 1.0])), ct_hu=ct if with_ct else None,
                body=body, structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                                       "SpinalCord": Structure("SpinalCord", cord, "oar")})
    return save_case_folder(case, tmp_path / name)


def test_ct_imputation_data_matches_the_encoding(tmp_path):
    dirs = [_case(tmp_path, "a"), _case(tmp_path, "b", with_ct=False)]
    data = load_ct_imputation_data(dirs, grid=(8, 8, 8))
    assert data.case_ids == ["a"]  # the case without CT is skipped
    x0, cond = data.batch([0])
    assert x0.shape == (1, 1, 8, 8, 8) and cond.shape == (1, 9, 8, 8, 8)  # ptv 1 + oar 7 + body 1
    # Independent check on the CT: 2x2x2 averages of window-scaled HU.
    hu = np.clip(np.where(np.pad(np.ones((12, 10, 12), bool), ((2, 2), (3, 3), (2, 2))), 40.0, -1000.0), -1000, 1000)
    hu[6:9, 6:9, 6:9] = 1000.0
    unit = hu.reshape(8, 2, 8, 2, 8, 2).mean(axis=(1, 3, 5)) / 1000.0
    np.testing.assert_allclose(x0[0, 0].numpy(), unit, atol=1e-5)
    # ptv channel: 70 Gy / 80 Gy scale -> 2 * 0.875 - 1 = 0.75 in full target cells, -1 outside.
    assert float(cond[0, 0].max()) == pytest.approx(0.75) and float(cond[0, 0].min()) == pytest.approx(-1.0)
    with pytest.raises(Exception, match="no case with a CT"):
        load_ct_imputation_data([dirs[1]], grid=(8, 8, 8))


def test_two_stage_training_runs_and_reports(tmp_path):
    data = load_ct_imputation_data([_case(tmp_path, "a")], grid=(8, 8, 8))
    model = PRDiT(config_for_ct_imputation(get_config("tiny")))
    reports = train_two_stage(model, data, StageSettings(steps=3, lr=1e-3), StageSettings(steps=2, lr=1e-3),
                              torch.Generator().manual_seed(0))
    assert [r.stage for r in reports] == ["local", "global"] and [r.steps for r in reports] == [3, 2]
    assert reports[0].cpu_seconds > 0 and reports[1].to_dict()["last50_mean_loss"] > 0
    assert paper_stage2_lr(4) == 9e-5 and paper_stage2_lr(12) == 4e-5


def test_train_ct_imputation_writes_a_usable_checkpoint(tmp_path):
    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.models.prdit import PRDiTImputer, read_checkpoint
    from diffkt3d.training.prdit_trainer import train_ct_imputation

    folder = _case(tmp_path, "a")
    path = train_ct_imputation([folder], tmp_path / "ct.pt", get_config("tiny"), (8, 8, 8),
                               StageSettings(steps=2, lr=1e-3), StageSettings(steps=1, lr=1e-3), meta={"cmd": "test"})
    blob = read_checkpoint(path)
    assert blob["meta"]["cases"] == ["a"] and blob["meta"]["cmd"] == "test"
    assert blob["preprocessing"]["encoding"]["grid"] == [8, 8, 8]
    ct = PRDiTImputer.from_checkpoint(path).impute_case(load_case_folder(folder), steps=2, seed=1)
    assert ct.shape == (16, 16, 16)


def test_budgets_stop_a_stage_early():
    from diffkt3d.training.prdit_trainer import VolumeSet, train_stage

    model = PRDiT(get_config("tiny"))
    data = VolumeSet(torch.zeros(1, 1, 8, 8, 8))
    assert train_stage(model, data, "local", StageSettings(steps=1000, max_wall_seconds=0.0)).steps == 1
    assert train_stage(model, data, "local", StageSettings(steps=1000, max_cpu_seconds=0.0)).steps == 1
    with pytest.raises(ValueError, match="global_depth >= 1"):
        train_stage(PRDiT(get_config("tiny", global_depth=0)), data, "global", StageSettings(steps=1))
