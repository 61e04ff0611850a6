"""A latent-space checkpoint served through ``Predictor.load``: tiny random Wan VAE + tiny DiT.

The checkpoint decides the path (``meta["latent"]``); its VAE is checked by fingerprint; the dose
comes back on the case grid in Gy with the Scorecard and DVH; condition latents are cached per
case, so a preview after a dose request encodes nothing; an edited contour is re-encoded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tiny_latent import save_tiny_vae  # noqa: E402

from diffkt3d.data.synthetic import make_synthetic_case  # noqa: E402
from diffkt3d.errors import ConfigError  # noqa: E402
from diffkt3d.inference import Predictor  # noqa: E402
from diffkt3d.inference.latent_predictor import LatentPredictor  # noqa: E402
from diffkt3d.models.wan_vae import WanLatentCodec  # noqa: E402

GRID = (32, 24, 20)  # (I, J, K) working grid of the synthetic case and of `tiny_latent_checkpoint`
CROP = (9, 16, 16)  # its crop, clip order (slices, y, x)
CONDITIONS = ["angle", "beam", "body", "ct", "oar", "ptv"]


@pytest.fixture(scope="module")
def predictor(tiny_latent_checkpoint, tiny_vae_dir):
    torch.set_num_threads(1)
    return Predictor.load(tiny_latent_checkpoint, device="cpu", vae_dir=tiny_vae_dir)


def test_checkpoint_picks_the_latent_path(predictor):
    assert isinstance(predictor, LatentPredictor)
    assert predictor.latent_grid == (3, 2, 2) and predictor.spec.crop == CROP


def test_dose_on_the_case_grid_in_gy_with_scorecard_and_cached_conditions(predictor):
    case = make_synthetic_case(shape=GRID)
    case.dose_gy = None
    pred = predictor.predict_dose(case, steps=2, candidates=2)
    assert pred.dose_gy.shape == case.grid.shape and pred.dose_gy.dtype == np.float32
    assert (pred.dose_gy >= 0).all() and (pred.dose_gy[~case.body] == 0).all()
    assert pred.dose_gy.max() > 0  # something was sampled inside the crop
    assert pred.scorecard is not None and pred.dvh  # Scorecard and DVH as for the voxel model
    d = pred.to_dict()
    # every condition the model knows (beam/angle plates from the plan), not the dose: it is the target
    assert d["latent"]["conditions_encoded"] == CONDITIONS
    assert d["latent"]["conditions_cached"] == []
    assert {"vae_encode_s", "latent_sample_s", "vae_decode_s"} <= set(d["timings"])

    # The preview re-encodes nothing; the same seed gives the same first candidate from cached latents.
    before = predictor.cache.misses
    preview = predictor.predict_dose(case, preview=True, template=None)
    assert predictor.cache.misses == before
    assert preview.latent["conditions_encoded"] == [] and preview.latent["conditions_cached"] == CONDITIONS
    again = predictor.predict_dose(case, steps=2, candidates=1, template=None)
    # (batch 1 vs 2: float rounding only)
    np.testing.assert_allclose(again.dose_gy, pred.candidates[0].dose_gy, atol=1e-3)

    # An OAR contour edited inside the crop is re-encoded (that modality only) and changes the dose.
    cord = case.structures["SpinalCord"]
    cord.mask = cord.mask | case.structures["PTV70"].mask
    edited = predictor.predict_dose(case, steps=2, candidates=1, template=None)
    assert edited.latent["conditions_encoded"] == ["oar"]
    assert not np.array_equal(edited.dose_gy, again.dose_gy)
    # A moved target moves the crop (centred on the PTV): the CT crop is new although the CT is not.
    case.structures["PTV70"].mask = np.roll(case.structures["PTV70"].mask, 2, axis=0)
    moved = predictor.predict_dose(case, steps=1, candidates=1, template=None)
    assert {"ct", "ptv", "oar"} <= set(moved.latent["conditions_encoded"])


def test_impute_runs_in_latent_space(predictor):
    case = make_synthetic_case(shape=GRID)
    res = predictor.impute(case, "ct", steps=1)
    assert res.ct_hu.shape == case.grid.shape and res.latent["latent_grid"] == [3, 2, 2]
    assert "dose" in res.latent["conditions_encoded"] + res.latent["conditions_cached"]  # dose conditions imputation


def test_wrong_or_missing_vae_is_refused(tiny_latent_checkpoint, tmp_path):
    latent_checkpoint = tiny_latent_checkpoint
    with pytest.raises(ConfigError, match=r"latent space of a Wan VAE .*--vae-dir"):
        Predictor.load(latent_checkpoint, device="cpu")
    other = save_tiny_vae(tmp_path / "other-vae", seed=1)  # same config, other weights
    with pytest.raises(ConfigError, match=r"fingerprint .* is not the one checkpoint latent.pt was trained with"):
        Predictor.load(latent_checkpoint, device="cpu", vae_dir=other)
    with pytest.raises(ConfigError, match="no AutoencoderKLWan config.json"):
        Predictor.load(latent_checkpoint, device="cpu", vae_dir=tmp_path)


def test_vae_runs_in_fp32_inside_a_bf16_autocast_region(tiny_vae_dir):
    """The sampler's bf16 region must not reach the VAE (an fp32 island, as Wan runs its VAE)."""
    codec = WanLatentCodec.from_pretrained(tiny_vae_dir)
    x = torch.rand(1, 1, 9, 16, 16) * 2 - 1
    z = codec.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf = codec.encode(x)
        out_bf = codec.decode(z)
    assert z_bf.dtype == torch.float32 and torch.equal(z_bf, z)
    assert out_bf.dtype == torch.float32 and torch.equal(out_bf, codec.decode(z))


def test_latent_path_reports_progress_per_step_of_a_dose_and_an_imputation(predictor):
    case = make_synthetic_case(shape=GRID)
    case.dose_gy = None
    seen = []
    predictor.predict_dose(case, steps=3, candidates=1, template=None, with_dvh=False,
                           on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    predictor.impute(case, "oar", steps=2, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]  # an imputation in latent space reports as the voxel path does
