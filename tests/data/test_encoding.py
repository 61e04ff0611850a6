"""Case <-> tensor encoding: ranges, channel order, round trips against the original arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.data.encoding import (
    EncodingConfig,
    available_modalities,
    decode_ct,
    decode_dose,
    decode_oar,
    decode_ptv,
    encode_case,
)


def test_every_modality_is_in_unit_range_on_the_working_grid(synthetic_case):
    from diffkt3d.data.plates import ensure_plates

    ensure_plates(synthetic_case)
    cfg = EncodingConfig(grid=(16, 16, 16))
    enc = encode_case(synthetic_case, cfg)
    assert set(enc) == {"ct", "ptv", "oar", "body", "beam", "angle", "dose"}
    for m, t in enc.items():
        assert t.shape[1:] == (16, 16, 16), m
        assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0, m
    assert enc["oar"].shape[0] == len(cfg.oar_channels)


def test_oar_channels_follow_the_configured_order(synthetic_case):
    cfg = EncodingConfig(grid=(32, 32, 32))
    oar = encode_case(synthetic_case, cfg, ("oar",))["oar"]
    for i, name in enumerate(cfg.oar_channels):
        expected = synthetic_case.structures[name].mask if name in synthetic_case.structures else None
        if expected is None:
            assert float(oar[i].max()) == -1.0, f"{name} absent -> all -1"
        else:
            assert torch.equal(oar[i] > 0, torch.as_tensor(expected)), name


def test_identity_grid_round_trips_are_exact(synthetic_case):
    cfg = EncodingConfig(grid=synthetic_case.grid.shape)
    enc = encode_case(synthetic_case, cfg)
    ct = decode_ct(enc["ct"], synthetic_case.grid, cfg)
    expected_ct = np.clip(synthetic_case.ct_hu, -1000, 1000)
    np.testing.assert_allclose(ct, expected_ct, atol=0.05)
    dose = decode_dose(enc["dose"], synthetic_case.grid, cfg, synthetic_case.body)
    np.testing.assert_allclose(dose, synthetic_case.dose_gy, atol=1e-3)
    masks = decode_oar(enc["oar"], synthetic_case.grid, cfg)
    assert np.array_equal(masks["SpinalCord"], synthetic_case.structures["SpinalCord"].mask)
    ptv = decode_ptv(enc["ptv"], synthetic_case.grid, cfg, [56.0, 70.0])
    assert np.array_equal(ptv["PTV70"], synthetic_case.structures["PTV70"].mask)
    assert np.array_equal(ptv["PTV56"], synthetic_case.structures["PTV56"].mask)


def test_dose_down_and_up_sampling_stays_inside_the_body(synthetic_case):
    cfg = EncodingConfig(grid=(16, 16, 16))
    enc = encode_case(synthetic_case, cfg, ("dose",))
    dose = decode_dose(enc["dose"], synthetic_case.grid, cfg, synthetic_case.body)
    assert dose.shape == synthetic_case.grid.shape and dose.dtype == np.float32
    assert (dose[~synthetic_case.body] == 0).all()
    # a smooth dose survives 2x pooling: mean error in the body well under 1 Gy
    err = np.abs(dose - synthetic_case.dose_gy)[synthetic_case.body].mean()
    assert err < 1.5, err


def test_missing_modalities_are_not_available(synthetic_case):
    synthetic_case.ct_hu = None
    synthetic_case.dose_gy = None
    mods = available_modalities(synthetic_case, EncodingConfig())
    assert "ct" not in mods and "dose" not in mods and "ptv" in mods


def test_config_round_trips_through_dict():
    cfg = EncodingConfig(grid=(32, 48, 64), oar_channels=("A", "B"))
    assert EncodingConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_modality_is_a_value_error(synthetic_case):
    with pytest.raises(ValueError, match="unknown modality"):
        encode_case(synthetic_case, EncodingConfig(grid=(16, 16, 16)), ("mri",))


def test_prescription_map_is_max_pooled_so_target_edges_keep_their_full_rx(synthetic_case):
    cfg = EncodingConfig(grid=(16, 16, 16))
    shape = synthetic_case.grid.shape
    factor = [s // g for s, g in zip(shape, cfg.grid, strict=True)]
    assert all(f >= 2 and f * g == s for f, g, s in zip(factor, cfg.grid, shape, strict=True))
    rx = np.clip(synthetic_case.prescription_map_gy() / cfg.dose_scale_gy, 0, 1)
    blocks = rx.reshape(cfg.grid[0], factor[0], cfg.grid[1], factor[1], cfg.grid[2], factor[2])
    expected_max, expected_mean = blocks.max(axis=(1, 3, 5)), blocks.mean(axis=(1, 3, 5))
    got_max = (encode_case(synthetic_case, cfg, ("ptv",))["ptv"][0].numpy() + 1) / 2
    np.testing.assert_allclose(got_max, expected_max, atol=1e-6)
    area = EncodingConfig(grid=cfg.grid, ptv_resampling="area")
    got_mean = (encode_case(synthetic_case, area, ("ptv",))["ptv"][0].numpy() + 1) / 2
    np.testing.assert_allclose(got_mean, expected_mean, atol=1e-6)
    # The edge voxels are where the two differ: max-pooling never lowers a voxel's Rx.
    assert (expected_max > expected_mean + 0.1).any()


def test_checkpoints_without_ptv_resampling_load_as_area_averaged():
    d = EncodingConfig(grid=(32, 32, 32)).to_dict()
    assert d["ptv_resampling"] == "max"
    del d["ptv_resampling"]
    assert EncodingConfig.from_dict(d).ptv_resampling == "area"


def test_unknown_ptv_resampling_is_named():
    with pytest.raises(ValueError, match="ptv_resampling.*'nearest'"):
        EncodingConfig(ptv_resampling="nearest")
