"""Latent cache of case folders (training layer): PTV-centred crops, one file per case, written once."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

from diffkt3d.data.encoding import EncodingConfig, encode_modality  # noqa: E402
from diffkt3d.data.synthetic import make_synthetic_case  # noqa: E402
from diffkt3d.io.case_folder import save_case_folder  # noqa: E402
from diffkt3d.models.wan_vae import WanLatentCodec, target_center  # noqa: E402
from diffkt3d.training.latent_cache import build_latent_cache, encode_case_latents  # noqa: E402

Z = 4


@pytest.fixture(scope="module")
def codec() -> WanLatentCodec:
    """A tiny random VAE with Wan 2.1's structure (8x space, causal 4x time), 4 base channels."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * Z, latents_std=[1.0] * Z)
    return WanLatentCodec(vae.eval())


def test_case_crop_is_centred_on_the_ptv(codec):
    """Case arrays (x, y, z) become clips (z, y, x): the slice axis is the VAE's time axis."""
    case = make_synthetic_case(shape=(32, 24, 20))
    enc = EncodingConfig(grid=(32, 24, 20))
    latents, crops, start = encode_case_latents(case, codec, enc, crop=(9, 16, 16))
    assert set(latents) >= {"ct", "ptv", "oar", "body", "dose"}
    assert latents["oar"].shape == (7 * Z, 3, 2, 2) and latents["dose"].shape == (Z, 3, 2, 2)
    z0, y0, x0 = start
    assert min(start) >= 0  # no padding needed here, so the crop is plain slicing of the case array
    ct = encode_modality(case, "ct", enc)  # (1, x, y, z)
    assert torch.equal(crops["ct"], ct[:, x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 9].permute(0, 3, 2, 1))
    c = target_center(crops["ptv"])
    assert all(abs(v - (n - 1) / 2) <= 1.0 for v, n in zip(c, (9, 16, 16), strict=True))



def test_cache_writes_each_case_once_under_a_key_of_its_inputs(codec, tmp_path):
    case_dir = save_case_folder(make_synthetic_case(shape=(32, 24, 20), case_id="c0"), tmp_path / "cases" / "c0")
    enc = EncodingConfig(grid=(32, 24, 20))
    files = build_latent_cache([case_dir], enc, codec, tmp_path / "lat", crop=(9, 16, 16), with_plates=False)
    assert len(files) == 1 and files[0].is_file() and files[0].parent.name.startswith("latent-")
    blob = torch.load(files[0], weights_only=True)
    assert blob["case_id"] == "c0" and blob["tensors"]["dose"].shape == (Z, 3, 2, 2)
    assert blob["tensors"]["dose"].dtype == torch.float16 and set(blob["voxel"]) == {"dose", "body"}
    stamp = files[0].stat().st_mtime_ns
    assert build_latent_cache([case_dir], enc, codec, tmp_path / "lat", crop=(9, 16, 16), with_plates=False) == files
    assert files[0].stat().st_mtime_ns == stamp  # read back, not re-encoded
    other = build_latent_cache([case_dir], enc, codec, tmp_path / "lat", crop=(5, 16, 16), with_plates=False)
    assert other[0].parent != files[0].parent  # another crop is another cache
