"""PRDiT model: shapes, init, locality, forward process, loss, conditions, config, checkpoints."""

import math

import pytest
import torch

from diffkt3d.errors import ConfigError
from diffkt3d.models.prdit import (
    PRDiT,
    PRDiTConfig,
    get_config,
    impute_ct,
    load_checkpoint,
    prdit_loss,
    q_sample,
    save_checkpoint,
    stack_conditions,
)
from diffkt3d.models.prdit.checkpoint import read_checkpoint

torch.set_num_threads(1)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised heads/gates random values so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _tiny(**kw) -> PRDiT:
    torch.manual_seed(0)
    return PRDiT(get_config("tiny", **kw))


def test_shapes_unconditional_and_conditional():
    x = torch.randn(2, 1, 16, 8, 12)
    t = torch.tensor([1.0, 999.0])
    out = _tiny()(x, t)
    for v in (out.x0_hat, out.eps_hat, out.x0_local, out.eps_local):
        assert v.shape == x.shape
    model = _tiny(conditions={"ptv": 1, "oar": 2})
    cond = stack_conditions({"ptv": torch.rand(2, 1, 16, 8, 12), "oar": torch.rand(2, 2, 16, 8, 12)}, model.config, x)
    assert cond.shape == (2, 3, 16, 8, 12)
    assert model(x, t, cond).x0_hat.shape == x.shape


def test_zero_init_heads():
    # Untrained local head predicts zeros; untrained global residual head adds nothing.
    model = _tiny()
    x = torch.randn(1, 1, 8, 8, 8)
    out = model(x, torch.tensor([500.0]))
    assert torch.equal(out.x0_local, torch.zeros_like(x)) and torch.equal(out.eps_local, torch.zeros_like(x))
    _randomise(model.local)
    out = model(x, torch.tensor([500.0]))
    assert out.x0_local.abs().sum() > 0
    assert torch.equal(out.x0_hat, out.x0_local) and torch.equal(out.eps_hat, out.eps_local)


def test_local_denoiser_is_patch_local_and_global_dit_is_not():
    # tiny: patch 6, stride 4, padding 1 -> the cell [0:4]^3 reads voxels [-1:5]^3 only.
    model = _tiny()
    _randomise(model)
    x = torch.randn(1, 1, 16, 16, 16)
    t = torch.tensor([300.0])
    x2 = x.clone()
    x2[..., 12, 12, 12] += 5.0  # far outside the first patch
    a, b = model(x, t), model(x2, t)
    assert torch.equal(a.x0_local[..., :4, :4, :4], b.x0_local[..., :4, :4, :4])
    assert not torch.equal(a.x0_hat[..., :4, :4, :4], b.x0_hat[..., :4, :4, :4])  # global attention sees it
    x3 = x.clone()
    x3[..., 4, 2, 2] += 5.0  # inside the first patch's 1-voxel margin
    assert not torch.equal(model(x3, t).x0_local[..., :4, :4, :4], a.x0_local[..., :4, :4, :4])


def test_forward_process_endpoints_and_midpoint():
    x0, eps = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([0.0, 1000.0, 500.0])
    x_t = q_sample(x0, t, eps, 1000)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], eps[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(x_t[2], (x0[2] + eps[2]) / math.sqrt(2.0))


def test_loss_equals_formula():
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(2, 1, 3, 3, 3, generator=g) for _ in range(4))
    expected = ((a - c) ** 2).sum() / a.numel() + ((b - d) ** 2).sum() / b.numel()
    torch.testing.assert_close(prdit_loss(a, b, c, d), expected)


def test_condition_errors_name_the_problem():
    model = _tiny(conditions={"ptv": 1, "body": 1})
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="missing \\['body'\\]"):
        stack_conditions({"ptv": torch.zeros(1, 1, 8, 8, 8)}, model.config, x)
    with pytest.raises(ValueError, match="condition 'body': expected shape \\(1, 1, 8, 8, 8\\)"):
        stack_conditions({"ptv": torch.zeros(1, 1, 8, 8, 8), "body": torch.zeros(1, 1, 8, 8, 4)}, model.config, x)
    with pytest.raises(ValueError, match="unconditional"):
        stack_conditions({"ptv": x}, _tiny().config, x)


def test_config_round_trip_presets_and_errors():
    cfg = get_config("paper-8l", conditions={"body": 1})
    assert (cfg.patch_size, cfg.stride, cfg.padding, cfg.global_depth, cfg.patch_dim) == (12, 8, 2, 8, 1728)
    assert PRDiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown PRDiT preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown PRDiTConfig fields"):
        get_config("tiny", depth=3)
    with pytest.raises(ValueError, match="patch_size must equal stride \\+ 2 \\* padding"):
        PRDiTConfig(patch_size=12, stride=8, padding=1)


def test_a_few_steps_reduce_the_loss():
    from diffkt3d.training.prdit_trainer import StageSettings, VolumeSet, train_stage

    model = _tiny(conditions={"body": 1})
    g = torch.Generator().manual_seed(0)
    x0 = torch.tanh(torch.randn(2, 1, 8, 8, 8, generator=g))
    body = torch.sign(torch.randn(2, 1, 8, 8, 8, generator=g))
    data = VolumeSet(x0, body)

    def eval_loss(stage):
        ge = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(model.training_loss(x0, body, stage, generator=ge)) for _ in range(8)) / 8

    before = eval_loss("local")
    train_stage(model, data, "local", StageSettings(steps=40, lr=1e-3, batch_size=2), g)
    after_local = eval_loss("local")
    assert after_local < 0.8 * before
    # Stage 2: the global DiT lowers the loss further and the local denoiser stays frozen.
    local_state = {k: v.clone() for k, v in model.local.state_dict().items()}
    before_global = eval_loss("global")
    assert before_global == pytest.approx(after_local)  # zero-initialised residual head
    train_stage(model, data, "global", StageSettings(steps=40, lr=1e-3, batch_size=2), g)
    assert eval_loss("global") < before_global
    assert all(torch.equal(v, model.local.state_dict()[k]) for k, v in local_state.items())


def test_checkpoint_rebuilds_model_from_file(tmp_path):
    model = _tiny(conditions={"body": 1})
    _randomise(model, 3)
    path = save_checkpoint(model, tmp_path / "m.pt", encoding={"grid": [8, 8, 8]}, meta={"note": "test"})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    x, c, t = torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 8, 8, 8), torch.tensor([250.0])
    torch.testing.assert_close(loaded(x, t, c).x0_hat, model(x, t, c).x0_hat, rtol=0, atol=0)
    blob = read_checkpoint(path)
    assert blob["preprocessing"]["ct_window_hu"] == [-1000.0, 1000.0] and blob["meta"] == {"note": "test"}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_impute_ct_shape_range_and_seed():
    model = _tiny(conditions={"body": 1})
    _randomise(model, 5)
    cond = {"body": torch.randn(2, 1, 8, 8, 8)}
    a = impute_ct(model, cond, steps=3, k=2.0, generator=torch.Generator().manual_seed(7))
    b = impute_ct(model, cond, steps=3, k=2.0, generator=torch.Generator().manual_seed(7))
    c = impute_ct(model, cond, steps=3, k=2.0, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 1, 8, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="sampler"):
        impute_ct(model, cond, steps=2, sampler="euler")


def test_sampling_k_defaults_come_from_the_one_product_default():
    import inspect

    from diffkt3d.inference.ct_backbone import PRDIT_DEFAULT_K, CTImputationConfig
    from diffkt3d.models.prdit import PRDiTImputer, sample_predictor_corrector

    assert PRDIT_DEFAULT_K == 1.0 and CTImputationConfig().prdit_k == PRDIT_DEFAULT_K
    for fn in (impute_ct, PRDiTImputer.impute_case, sample_predictor_corrector):
        assert inspect.signature(fn).parameters["k"].default == PRDIT_DEFAULT_K, fn.__qualname__


def test_local_denoiser_follows_equation_2():
    # Re-implement PRDiT paper eq. 2 with plain tensor ops and slicing, using the module's weights.
    import torch.nn.functional as F

    model = _tiny(conditions={"body": 1})
    _randomise(model, 9)
    loc = model.local
    cfg = model.config
    x_t, body, t = torch.randn(1, 1, 8, 4, 4), torch.randn(1, 1, 8, 4, 4), torch.tensor([321.0])
    out = loc(x_t, t, body)
    p, s, pad = cfg.patch_size, cfg.stride, cfg.padding
    xp, bp = F.pad(x_t, (pad,) * 6), F.pad(body, (pad,) * 6)
    half = cfg.time_freq_dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float64) / half * torch.log(torch.tensor(10000.0, dtype=torch.float64)))
    ang = 321.0 * freqs
    feat = torch.cat([torch.cos(ang), torch.sin(ang)]).float()[None]
    c = loc.time_embed.mlp(feat)
    mod = loc.adaln(loc.c_local(c))[0]
    d = cfg.patch_dim
    sh1, sc1, sh2, sc2 = mod[:d], mod[d : 2 * d], mod[2 * d : 3 * d], mod[3 * d :]

    def swiglu(m, v):
        return m.out(F.silu(m.gate(v)) * m.up(v))

    for a in range(2):  # the two patches along D
        v = xp[0, :, a * s : a * s + p, 0:p, 0:p].reshape(-1)
        v = v + loc.cond_proj(bp[0, :, a * s : a * s + p, 0:p, 0:p].reshape(-1))
        z1 = swiglu(loc.mlp1, F.layer_norm(v, (d,), eps=cfg.eps) * (1 + sc1) + sh1)
        z2 = swiglu(loc.mlp2, F.layer_norm(z1, (d,), eps=cfg.eps) * (1 + sc2) + sh2)
        head = loc.final(z2 + v)
        x_cell, eps_cell = head[: s**3].reshape(s, s, s), head[s**3 :].reshape(s, s, s)
        torch.testing.assert_close(out.x0_hat[0, 0, a * s : (a + 1) * s], x_cell, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.eps_hat[0, 0, a * s : (a + 1) * s], eps_cell, rtol=1e-4, atol=1e-5)


def test_imputer_from_checkpoint_maps_a_case_to_hu(tmp_path):
    import numpy as np

    from diffkt3d.data.case import Case, Grid
    from diffkt3d.data.encoding import EncodingConfig
    from diffkt3d.models.prdit import PRDiTImputer

    model = _tiny(conditions={"body": 1})
    _randomise(model, 2)
    enc = EncodingConfig(grid=(8, 8, 8))
    path = save_checkpoint(model, tmp_path / "ct.pt", encoding=enc.to_dict())
    body = np.zeros((16, 16, 16), bool)
    body[4:12, 4:12, 4:12] = True
    case = Case(case_id="c1", grid=Grid((16, 16, 16), np.eye(4)), body=body)
    ct = PRDiTImputer.from_checkpoint(path).impute_case(case, steps=2, k=2.0, seed=0)
    assert ct.shape == (16, 16, 16) and ct.dtype == np.float32
    assert np.all(ct[~body] == -1000.0) and ct.min() >= -1000.0 and ct.max() <= 1000.0
    save_checkpoint(model, tmp_path / "noenc.pt")
    with pytest.raises(ConfigError, match="no data encoding"):
        PRDiTImputer.from_checkpoint(tmp_path / "noenc.pt")
