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
    low_state = {k: v.clone() for k, v in low.state_dict().items()}
    x0 = torch.tanh(torch.randn(2, 1, 16, 16, 8))
    body = torch.sign(x0)
    # loss(lf_weight=w) - loss(0) = w * mse(avgpool(x0_hat), x0_low) for the same draw of t, eps
    l0 = hr.training_loss(x0, body, lf_weight=0.0, generator=torch.Generator().manual_seed(4))
    l2 = hr.training_loss(x0, body, lf_weight=2.0, generator=torch.Generator().manual_seed(4))
    assert float((l2 - l0).detach()) > 0
    report = train_stage(hr, VolumeSet(x0, body), "highres", StageSettings(steps=5, lr=1e-3, batch_size=2))
    assert report.steps == 5 and all(torch.isfinite(torch.tensor(report.losses)))
    assert all(torch.equal(v, low.state_dict()[k]) for k, v in low_state.items())
    assert any(p.abs().sum() > 0 for p in hr.refiner.final.parameters())


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
