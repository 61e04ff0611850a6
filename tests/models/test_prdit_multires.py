"""Low -> high resolution PRDiT: nearest/trilinear plumbing, frozen low model, LF consistency."""

import pytest
import torch
import torch.nn.functional as F

from diffkt3d.models.prdit import (
    PRDiT,
    PRDiTHighRes,
    get_config,
    load_checkpoint,
    refiner_config,
    save_checkpoint,
)
from diffkt3d.models.prdit.sampler import sample_predictor_corrector

torch.set_num_threads(1)


def _models():
    torch.manual_seed(0)
    low = PRDiT(get_config("tiny", conditions={"body": 1}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in low.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return low, PRDiTHighRes(low, refiner_config(low.config), scale=2)


def test_untrained_refiner_returns_the_upsampled_low_resolution_estimate():
    low, hr = _models()
    x_t = torch.randn(1, 1, 16, 16, 8)
    body = torch.randn(1, 1, 16, 16, 8)
    t = torch.tensor([400.0])
    out = hr(x_t, t, body)
    # Independent recomputation: nearest downsample = every second voxel, conditions averaged.
    ref = low(x_t[:, :, 0::2, 0::2, 0::2], t, F.avg_pool3d(body, 2))
    torch.testing.assert_close(out.x0_low, ref.x0_hat)
    torch.testing.assert_close(out.x0_hat, F.interpolate(ref.x0_hat, size=(16, 16, 8), mode="trilinear"))
    eps_nearest = ref.eps_hat.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(out.eps_hat, eps_nearest)


def test_highres_training_changes_only_the_refiner_and_lf_term_is_added():
    from diffkt3d.training.prdit_trainer import StageSettings, VolumeSet, train_stage

    low, hr = _models()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a non-zero refiner head, so x0_hat is more than the upsampled estimate
        for p in hr.refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    low_state = {k: v.clone() for k, v in low.state_dict().items()}
    x0 = torch.tanh(torch.randn(2, 1, 16, 16, 8, generator=g))
    body = torch.sign(x0)
    # loss(lf_weight=w) - loss(0) = w * mean((avgpool_2(x0_hat) - x0_low)^2) for the same draw of t, eps.
    w = 2.0
    l0 = hr.training_loss(x0, body, lf_weight=0.0, generator=torch.Generator().manual_seed(4))
    lw = hr.training_loss(x0, body, lf_weight=w, generator=torch.Generator().manual_seed(4))
    # Independent LF term: redo the draw (t uniform in 1..T, then eps), the forward process, the
    # low model on every second voxel and 2x2x2 block means by reshaping.
    gd = torch.Generator().manual_seed(4)
    t = torch.randint(1, 1001, (2,), generator=gd).float()
    eps = torch.randn(x0.shape, generator=gd)
    th = (t * torch.pi / 2000).view(-1, 1, 1, 1, 1)
    x_t = torch.cos(th) * x0 + torch.sin(th) * eps
    with torch.no_grad():
        out = hr(x_t, t, body)
        x0_low = low(x_t[:, :, ::2, ::2, ::2], t, F.avg_pool3d(body, 2)).x0_hat
    torch.testing.assert_close(out.x0_low, x0_low)
    pooled = out.x0_hat.reshape(2, 1, 8, 2, 8, 2, 4, 2).mean(dim=(3, 5, 7))
    lf = float(((pooled - x0_low) ** 2).mean())
    l0_ref = float(((out.x0_hat - x0) ** 2).mean() + ((out.eps_hat - eps) ** 2).mean())
    assert lf > 1e-3  # the term is not trivially zero
    assert float(l0.detach()) == pytest.approx(l0_ref, rel=1e-5)  # the draw was reproduced
    assert float((lw - l0).detach()) == pytest.approx(w * lf, rel=1e-4, abs=1e-7)
    refiner_state = {k: v.clone() for k, v in hr.refiner.state_dict().items()}
    report = train_stage(hr, VolumeSet(x0, body), "highres", StageSettings(steps=5, lr=1e-3, batch_size=2))
    assert report.steps == 5 and all(torch.isfinite(torch.tensor(report.losses)))
    assert all(torch.equal(v, low.state_dict()[k]) for k, v in low_state.items())
    assert any(not torch.equal(v, hr.refiner.state_dict()[k]) for k, v in refiner_state.items())


def test_highres_samples_and_checkpoint_round_trip(tmp_path):
    _, hr = _models()
    body = torch.randn(1, 1, 16, 8, 8)
    cond = body
    x_T = torch.randn(1, 1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_predictor_corrector(hr.denoiser(cond), x_T, 3, k=2.0, generator=torch.Generator().manual_seed(1))
    assert out.sample.shape == x_T.shape
    loaded = load_checkpoint(save_checkpoint(hr, tmp_path / "hr.pt"))
    assert isinstance(loaded, PRDiTHighRes) and loaded.scale == 2
    t = torch.tensor([100.0])
    torch.testing.assert_close(loaded(x_T, t, cond).x0_hat, hr(x_T, t, cond).x0_hat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible by the scale"):
        hr(torch.randn(1, 1, 15, 8, 8), t, torch.randn(1, 1, 15, 8, 8))
