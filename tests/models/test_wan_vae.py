"""Frozen Wan VAE latent path on a tiny random AutoencoderKLWan."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

from diffkt3d.flow.sampler import sample, seeded_noise  # noqa: E402
from diffkt3d.models.any2any_dit import Any2AnyDiT  # noqa: E402
from diffkt3d.models.config import DiTConfig  # noqa: E402
from diffkt3d.models.wan_vae import (  # noqa: E402
    ConditionLatentCache,
    WanLatentCodec,
    check_vae_shape,
    crop_or_pad,
    largest_valid_depth,
    latent_sample,
    uncrop,
)

Z = 4
MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.5, 0.5, 2.0, 1.0]


def tiny_vae() -> AutoencoderKLWan:
    """Same structure as Wan 2.1's VAE (4 stages: 8x space, causal 4x time), 4 base channels."""
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_vae")
    tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir) -> WanLatentCodec:
    torch.set_num_threads(1)
    return WanLatentCodec.from_pretrained(vae_dir)


def test_crop_pad_and_shape_rules():
    vol = torch.arange(2 * 10 * 12 * 14, dtype=torch.float32).reshape(2, 10, 12, 14)
    crop, start = crop_or_pad(vol, (5, 16, 6), center=(4.0, 5.5, 9.0))
    assert crop.shape == (2, 5, 16, 6) and start == (2, -2, 6)
    assert torch.equal(crop[:, :, 2:14], vol[:, 2:7, 0:12, 6:12])  # inside: plain slicing
    assert (crop[:, :, :2] == -1).all() and (crop[:, :, 14:] == -1).all()  # padded rows
    back = uncrop(crop, start, (10, 12, 14))
    assert torch.equal(back[:, 2:7, :, 6:12], vol[:, 2:7, :, 6:12]) and (back[:, :2] == -1).all()
    assert largest_valid_depth(128) == 125 and largest_valid_depth(97) == 97
    check_vae_shape((97, 128, 160))
    with pytest.raises(ValueError, match=r"depth 96 is not 4k \+ 1"):
        check_vae_shape((96, 128, 160))
    with pytest.raises(ValueError, match="multiples of 8"):
        check_vae_shape((97, 100, 160))


def test_encode_normalises_with_config_constants(codec, vae_dir):
    torch.manual_seed(1)
    x = torch.rand(1, 2, 9, 16, 24) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (1, 2 * Z, 3, 2, 3)  # time (9 - 1) / 4 + 1, space / 8, channels 2 x z_dim
    assert not any(p.requires_grad for p in codec.parameters())
    ref_vae = AutoencoderKLWan.from_pretrained(vae_dir).eval()  # independent path through diffusers
    with torch.no_grad():
        mu = ref_vae.encode(x[:, 1:2].repeat(1, 3, 1, 1, 1)).latent_dist.mean
    expected = (mu - torch.tensor(MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1, 1)
    assert torch.allclose(z[:, Z:], expected, atol=1e-5)
    with torch.no_grad():
        rgb = ref_vae.decode(mu).sample
    assert torch.allclose(codec.decode(z[:, Z:]), rgb.mean(1, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError, match="4k"):
        codec.encode(torch.zeros(1, 1, 8, 16, 16))


def test_encode_dit_decode_end_to_end(codec):
    torch.manual_seed(2)
    ct = torch.rand(1, 1, 9, 16, 32) * 2 - 1
    grid = codec.latent_shape((9, 16, 32))
    assert grid == (3, 2, 4)
    model = Any2AnyDiT(DiTConfig(modalities=("ct", "dose"), in_channels={"ct": Z, "dose": Z}, patch=(1, 2, 2),
                                 dim=24, depth=1, heads=2, ffn_dim=32, rope_slot_stride=4)).eval()
    with torch.no_grad():
        for head in model.head.head.values():  # non-zero head so the sample depends on the DiT
            head.weight.normal_(0, 0.1)
    cache = ConditionLatentCache(codec)
    cond = {"ct": cache.get("case0", "ct", ct[0])[None]}
    dose = latent_sample(model, codec, cond, "dose", 1, grid, steps=2, seeds=[0])
    assert dose.shape == (1, 1, 9, 16, 32) and torch.isfinite(dose).all() and dose.abs().max() <= 1
    again = latent_sample(model, codec, cond, "dose", 1, grid, steps=2, seeds=[0])
    assert torch.equal(dose, again)  # deterministic given the seed
    other = latent_sample(model, codec, cond, "dose", 1, grid, steps=2, seeds=[1])
    assert not torch.equal(dose, other)
    # The shared seeded sampler, run by hand: seed 0's noise, Euler in latent space, VAE decoder.
    noise = seeded_noise((Z, *grid), [0])
    with torch.no_grad():
        z0 = sample(lambda x, t: model({**cond, "dose": x}, "dose", t).float(), noise, steps=2)
    assert torch.equal(dose, codec.decode(z0))


def test_condition_latents_cached_per_case(codec, tmp_path):
    vol = torch.rand(1, 9, 16, 16) * 2 - 1
    cache = ConditionLatentCache(codec, tmp_path / "lat")
    first = cache.get("pt_1", "ct", vol)
    assert torch.equal(cache.get("pt_1", "ct", vol), first) and (cache.hits, cache.misses) == (1, 1)
    fresh = ConditionLatentCache(codec, tmp_path / "lat")  # a new session reads the disk cache
    assert torch.equal(fresh.get("pt_1", "ct", vol), first) and (fresh.hits, fresh.misses) == (1, 0)
    edited = vol.clone()
    edited[0, 4, 8, 8] = 1.0
    fresh.get("pt_1", "ct", edited)  # an edited volume is re-encoded, not served stale
    assert fresh.misses == 1


def test_fingerprint_covers_config_and_weights(codec, vae_dir):
    """Latents of a VAE with the same config but other weights are another latent space."""
    assert codec.fingerprint() == WanLatentCodec.from_pretrained(vae_dir).fingerprint()
    torch.manual_seed(5)
    other = AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD)
    assert WanLatentCodec(other).fingerprint() != codec.fingerprint()
