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


def _case(tmp_path, name, with_ct=True, with_body=True):
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
                body=body if with_body else None, structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                                       "SpinalCord": Structure("SpinalCord", cord, "oar")})
    return save_case_folder(case, tmp_path / name)


def test_ct_imputation_data_matches_the_encoding(tmp_path):
    dirs = [_case(tmp_path, "a"), _case(tmp_path, "b", with_ct=False), _case(tmp_path, "c", with_body=False)]
    data = load_ct_imputation_data(dirs, grid=(8, 8, 8))
    assert data.case_ids == ["a"]  # the cases without CT / body mask are skipped, and say why
    assert data.skipped == {"b": "no CT", "c": "no body mask"}
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


def test_unconditional_ct_generator_trains_and_samples_end_to_end(tmp_path):
    """The paper's setting: PRDiT with no conditions, trained on CT volumes alone, samples a CT."""
    import numpy as np

    from diffkt3d.data.case import Case, Grid
    from diffkt3d.data.encoding import EncodingConfig
    from diffkt3d.models.prdit import PRDiTImputer, impute_ct, load_checkpoint, save_checkpoint
    from diffkt3d.training.prdit_trainer import VolumeSet

    # Tiny synthetic "CTs" in [-1, 1]: air around a soft-tissue box with a bright sphere at a random place.
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*(torch.arange(8.0),) * 3, indexing="ij")
    vols = []
    for _ in range(4):
        c = torch.randint(2, 6, (3,), generator=g).float()
        v = torch.full((8, 8, 8), -1.0)
        v[1:7, 1:7, 1:7] = 0.05
        v[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 2.0] = 0.8
        vols.append(v)
    data = VolumeSet(torch.stack(vols)[:, None])
    assert data.conditions is None

    torch.manual_seed(0)
    model = PRDiT(get_config("tiny"))  # tiny preset: no conditions, global DiT depth 1
    assert model.config.conditions == {} and model.config.cond_channels == 0
    global_before = {k: v.clone() for k, v in model.global_dit.state_dict().items()}
    reports = train_two_stage(model, data, StageSettings(steps=15, lr=1e-3, batch_size=2),
                              StageSettings(steps=5, lr=1e-3, batch_size=2), torch.Generator().manual_seed(1))
    assert [(r.stage, r.steps) for r in reports] == [("local", 15), ("global", 5)]
    assert all(np.isfinite(r.losses).all() for r in reports)
    assert any(not torch.equal(v, model.global_dit.state_dict()[k]) for k, v in global_before.items())

    # Sample with no conditions (shape given), through a checkpoint round trip.
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "uncond.pt",
                                             encoding=EncodingConfig(grid=(8, 8, 8)).to_dict()))

    def sample(m, seed, k=2.0):
        return impute_ct(m, None, steps=4, k=k, generator=torch.Generator().manual_seed(seed), shape=(2, 8, 8, 8))

    a, b, c = sample(model, 7), sample(loaded, 7), sample(model, 8)
    assert a.shape == (2, 1, 8, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed same CT, also after reloading
    assert not torch.equal(a[0], a[1])  # batch items get their own noise
    cold = impute_ct(model, {}, steps=4, generator=torch.Generator().manual_seed(7), shape=(1, 8, 8, 8))
    assert cold.shape == (1, 1, 8, 8, 8) and torch.isfinite(cold).all()  # default k, empty conditions
    with pytest.raises(ValueError, match="unconditional"):
        impute_ct(model, {"body": torch.zeros(1, 1, 8, 8, 8)}, steps=2)
    with pytest.raises(ValueError, match="needs conditions or shape"):
        impute_ct(model, None, steps=2)

    # The case-level path: a case with nothing but a grid gets a CT in HU on its grid.
    case = Case(case_id="empty", grid=Grid((16, 16, 16), np.eye(4)))
    imputer = PRDiTImputer.from_checkpoint(tmp_path / "uncond.pt")
    ct = imputer.impute_case(case, steps=3, seed=3)
    assert ct.shape == (16, 16, 16) and ct.dtype == np.float32 and np.isfinite(ct).all()
    assert ct.min() >= -1000.0 and ct.max() <= 1000.0
    np.testing.assert_array_equal(ct, imputer.impute_case(case, steps=3, seed=3))
