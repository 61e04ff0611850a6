"""A tiny random Wan VAE and a latent-space checkpoint made for it (tests only: nothing downloaded).

The VAE has Wan 2.1's structure (8x space, causal 4x time) with 4 base channels and z_dim 4; the
DiT is the `tiny` preset on latents with patch (1, 2, 2) and non-zero gates and heads, so its
samples depend on the conditions (the real init zeroes them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import save_checkpoint
from diffkt3d.models.config import get_config
from diffkt3d.models.wan_vae import WanLatentCodec

Z = 4


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                     latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(path)
    return path


def write_tiny_latent_checkpoint(path: Path, vae_dir: Path, grid: tuple[int, int, int],
                                 crop: tuple[int, int, int], seed: int = 0) -> Path:
    codec = WanLatentCodec.from_pretrained(vae_dir)
    enc = EncodingConfig(grid=grid)
    cfg = get_config("tiny", in_channels={m: c * codec.z_dim for m, c in enc.channels().items()},
                     modalities=list(enc.modalities), patch=(1, 2, 2), dim=24, heads=2, ffn_dim=32,
                     rope_slot_stride=4, zero_init_modulation=False)
    torch.manual_seed(seed)
    model = Any2AnyDiT(cfg).eval()
    with torch.no_grad():
        for head in model.head.head.values():
            head.weight.normal_(0, 0.1)
    meta = {"name": "tiny-latent",
            "latent": {"vae_fingerprint": codec.fingerprint(), "crop": list(crop), "z_dim": codec.z_dim}}
    return save_checkpoint(path, model, cfg, enc, flow_shift=3.0, meta=meta)
