"""Frozen Wan 2.1 VAE latent path: volumes -> normalised VAE latents -> DiT -> VAE decoder -> volumes.

DiffKT3D runs its DiT in the latent space of the frozen Wan 2.1 VAE (``AutoencoderKLWan``: 16
latent channels, causal 4x compression in time, 8x in space). A 3D volume is handed to the video
VAE as a clip: depth D becomes time T, so D must be 4k + 1 (the first frame is encoded alone by
the causal encoder) and H, W multiples of 8; the paper crops every case to 97 x 128 x 160 around
the PTV isocentre (97 = 4 * 24 + 1) -> latents 25 x 16 x 20 -> with patch (1, 2, 2) 2000 tokens
per modality.

Channels: the VAE expects 3 (RGB) channels in [-1, 1]. Each channel of a modality is encoded on
its own as a grey clip (the channel copied to R, G and B); its latents are normalised per channel,
``z = (mu - latents_mean) / latents_std`` with the constants of the VAE's config (Wan's pipeline
does the same), and stacked, so a modality with C channels has ``C * z_dim`` latent channels
(``oar``: 7 OARs -> 112). Decoding reverses this and averages the 3 output channels. The encoder
posterior mean is used (no sampling), so latents are deterministic and can be cached per case.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from diffkt3d.errors import ConfigError
from diffkt3d.flow.sampler import sample_with_seeds

__all__ = [
    "PAPER_CROP",
    "CASE_TO_CLIP_AXES",
    "WanLatentCodec",
    "check_vae_shape",
    "largest_valid_depth",
    "crop_or_pad",
    "uncrop",
    "target_center",
    "crop_clips",
    "ConditionLatentCache",
    "latent_sample",
]


PAPER_CROP: tuple[int, int, int] = (97, 128, 160)  # (D, H, W) voxels, DiffKT3D supplement (z, y, x)
# Case arrays are NIfTI-ordered (I, J, K) = (x, y, z); the paper's crop is z-y-x (GDP-HMM), i.e. the
# slice axis plays the video's time axis. (C, I, J, K) -> (C, K, J, I); the permutation is its own
# inverse, so the same call maps clips back to case order.
CASE_TO_CLIP_AXES: tuple[int, int, int, int] = (0, 3, 2, 1)


def check_vae_shape(spatial: tuple[int, ...], temporal_factor: int = 4, spatial_factor: int = 8) -> None:
    """Raise ValueError unless (D, H, W) fits the Wan VAE: D = k * temporal + 1, H, W % spatial == 0."""
    d, h, w = (int(s) for s in spatial)
    problems = []
    if d < 1 or (d - 1) % temporal_factor:
        problems.append(f"depth {d} is not {temporal_factor}k + 1 (causal time axis; e.g. "
                        f"{largest_valid_depth(max(d, 1), temporal_factor)})")
    if h % spatial_factor or w % spatial_factor:
        problems.append(f"H, W = {h}, {w} are not multiples of {spatial_factor}")
    if problems:
        raise ValueError(f"volume (D, H, W) = {(d, h, w)} does not fit the Wan VAE: " + "; ".join(problems))


def largest_valid_depth(depth: int, temporal_factor: int = 4) -> int:
    """Largest 4k + 1 <= depth (e.g. 128 -> 125, 97 -> 97)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, found {depth}")
    return depth - (depth - 1) % temporal_factor


def crop_or_pad(
    volume: Tensor, size: tuple[int, int, int], center: tuple[float, float, float] | None = None,
    fill: float = -1.0,
) -> tuple[Tensor, tuple[int, int, int]]:
    """Cut a ``size`` box centred on ``center`` out of (C, D, H, W), padding with ``fill`` outside.

    Args:
        volume: (C, D, H, W); [-1, 1] encoded modalities use ``fill = -1`` (= 0 HU-window floor /
            no structure / 0 Gy) so padding looks like empty space.
        size: output (D, H, W), e.g. :data:`PAPER_CROP`.
        center: voxel (d, h, w) the box is centred on (e.g. :func:`target_center`); default the
            volume centre.

    Returns:
        (C, *size) crop and ``start``: the volume index of the crop's first voxel per axis (may be
        negative where padded). :func:`uncrop` puts a crop back.
    """
    spatial = volume.shape[1:]
    if center is None:
        center = tuple((s - 1) / 2 for s in spatial)
    start = tuple(int(round(c - (n - 1) / 2)) for c, n in zip(center, size, strict=True))
    out = volume.new_full((volume.shape[0], *size), fill)
    src, dst = [], []
    for s0, n, full in zip(start, size, spatial, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, full)
        if hi <= lo:
            raise ValueError(f"crop start {start} size {size} does not overlap the volume {tuple(spatial)}")
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out, start


def uncrop(crop: Tensor, start: tuple[int, int, int], spatial: tuple[int, int, int], fill: float = -1.0) -> Tensor:
    """Inverse of :func:`crop_or_pad`: (C, *size) back into a (C, *spatial) volume filled with ``fill``."""
    out = crop.new_full((crop.shape[0], *spatial), fill)
    src, dst = [], []
    for s0, n, full in zip(start, crop.shape[1:], spatial, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, full)
        dst.append(slice(lo, hi))
        src.append(slice(lo - s0, hi - s0))
    out[(slice(None), *dst)] = crop[(slice(None), *src)]
    return out


def target_center(ptv: Tensor) -> tuple[float, float, float] | None:
    """Centroid (d, h, w) of the target voxels of an encoded ``ptv`` (C, D, H, W) (> -1 = inside)."""
    idx = torch.nonzero(ptv[0] > -1.0 + 1e-6).float()
    if idx.numel() == 0:
        return None
    return tuple(float(v) for v in idx.mean(dim=0))


def crop_clips(voxels: Mapping[str, Tensor], crop: tuple[int, int, int]) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
    """Encoded case volumes {m: (C, I, J, K)} -> clip-order crops {m: (C, *crop)} and the crop start.

    The one crop rule of the latent path, shared by the training cache and inference (a crop that
    moved between the two would show the model conditions it never saw): volumes are turned to
    clip order (z, y, x) (:data:`CASE_TO_CLIP_AXES`) and cut around the PTV centre (the volume
    centre without a ``ptv``). ``start`` is in clip order (see :func:`uncrop`).
    """
    if not voxels:
        raise ValueError("no volume to crop")
    clips = {m: v.permute(*CASE_TO_CLIP_AXES) for m, v in voxels.items()}  # (C, z, y, x)
    center = target_center(clips["ptv"]) if "ptv" in clips else None
    crops, start = {}, (0, 0, 0)
    for m, vol in clips.items():
        crops[m], start = crop_or_pad(vol, crop, center)
    return crops, start


class WanLatentCodec(nn.Module):
    """Frozen Wan VAE with DiffKT3D's channel and normalisation conventions.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` (frozen here: eval mode, no gradients).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.temporal_factor = 2 ** sum(bool(v) for v in cfg.temperal_downsample)
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ConfigError(f"VAE config: latents_mean/std have {mean.numel()}/{std.numel()} values, z_dim is {self.z_dim}")
        # Persistent=False: constants of the VAE config, not weights of ours.
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)
        self._fingerprint: str | None = None  # the VAE is frozen: hashed once

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> WanLatentCodec:
        """Load a local ``AutoencoderKLWan`` folder (or a diffusers pipeline folder with ``vae/``).

        Never downloads (``local_files_only``): the user supplies Wan2.1-T2V-1.3B(-Diffusers).
        """
        from diffusers import AutoencoderKLWan

        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file() and (local_dir / "vae" / "config.json").is_file():
            local_dir = local_dir / "vae"
        if not (local_dir / "config.json").is_file():
            raise ConfigError(f"no AutoencoderKLWan config.json in {local_dir} (expected a diffusers VAE folder)")
        try:
            vae = AutoencoderKLWan.from_pretrained(str(local_dir), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the Wan VAE from {local_dir}: {exc}") from None
        return cls(vae).to(device)

    def fingerprint(self) -> str:
        """Short hash of the VAE config and weights: latents of another VAE are not reusable.

        Stored in latent checkpoints (``meta["latent"]["vae_fingerprint"]``) and in every cache
        key. The weights are part of it because two VAEs with one config (the same architecture
        trained differently, or loaded in another dtype) encode to different latent spaces; hashing
        the ~0.5 GB of Wan 2.1's VAE takes about a second, once per codec.
        """
        if self._fingerprint is None:
            h = hashlib.sha1(json.dumps({k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")},
                                        sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:10]
        return self._fingerprint

    def latent_shape(self, spatial: tuple[int, int, int]) -> tuple[int, int, int]:
        """(D, H, W) voxels -> (d, h, w) latent grid; raises ValueError if the shape does not fit."""
        check_vae_shape(spatial, self.temporal_factor, self.spatial_factor)
        d, h, w = spatial
        return (d - 1) // self.temporal_factor + 1, h // self.spatial_factor, w // self.spatial_factor

    @torch.no_grad()
    def encode(self, volume: Tensor) -> Tensor:
        """(B, C, D, H, W) in [-1, 1] -> normalised latents (B, C * z_dim, d, h, w), fp32.

        Runs in the VAE's own dtype with autocast off, also when called inside a bf16 autocast
        region: the VAE is a frozen model with its own numerics (Wan's pipeline keeps it in fp32).
        """
        self.latent_shape(tuple(volume.shape[2:]))
        dtype = next(self.vae.parameters()).dtype
        volume = volume.to(self.latents_mean.device)
        out = []
        with torch.autocast(device_type=volume.device.type, enabled=False):
            for c in range(volume.shape[1]):
                clip = volume[:, c : c + 1].expand(-1, 3, -1, -1, -1).to(dtype)  # grey -> RGB, D plays time
                mu = self.vae.encode(clip).latent_dist.mean.float()  # (B, z, d, h, w)
                out.append((mu - self.latents_mean) / self.latents_std)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C * z_dim, d, h, w) normalised latents -> (B, C, D, H, W) in [-1, 1], fp32.

        Autocast off, in the VAE's dtype (see :meth:`encode`): the sampler's bf16 region ends at
        the DiT, and the decoder reads the fp32 latents the Euler steps accumulated.
        """
        if latents.shape[1] % self.z_dim:
            raise ValueError(f"latent channels {latents.shape[1]} are not a multiple of z_dim {self.z_dim}")
        dtype = next(self.vae.parameters()).dtype
        latents = latents.to(self.latents_mean.device)
        out = []
        with torch.autocast(device_type=latents.device.type, enabled=False):
            for z in latents.float().split(self.z_dim, dim=1):
                mu = z * self.latents_std + self.latents_mean
                rgb = self.vae.decode(mu.to(dtype)).sample.float()  # (B, 3, D, H, W)
                out.append(rgb.mean(dim=1, keepdim=True))
        return torch.cat(out, dim=1)


class ConditionLatentCache:
    """Per-case cache of condition latents (inference: conditions are encoded once per case).

    Keyed by case id, modality, VAE fingerprint and a content hash of the voxel volume, so an edited
    contour is re-encoded and an unchanged one never is (a preview after a dose request encodes
    nothing); kept in memory (the ``max_entries`` most recently used, so a server that sees many
    cases does not grow without bound) and, with ``cache_dir``, on disk across sessions.
    ``hits`` / ``misses`` count lookups since creation.
    """

    def __init__(self, codec: WanLatentCodec, cache_dir: str | Path | None = None, max_entries: int = 256):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, found {max_entries}")
        self.codec = codec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_entries = int(max_entries)
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _key(self, case_id: str, modality: str, volume: Tensor) -> str:
        digest = hashlib.sha1(volume.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]
        return f"{case_id}__{modality}__{self.codec.fingerprint()}__{digest}"

    def lookup(self, case_id: str, modality: str, volume: Tensor) -> tuple[Tensor, bool]:
        """(latents (C * z, d, h, w) of one condition volume (C, D, H, W), whether they were cached)."""
        key = self._key(case_id, modality, volume)
        if key in self._memory:
            self.hits += 1
            self._memory.move_to_end(key)
            return self._memory[key], True
        path = self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None
        cached = path is not None and path.is_file()
        if cached:
            latent = torch.load(path, weights_only=True)
            self.hits += 1
        else:
            latent = self.codec.encode(volume[None].float())[0]
            self.misses += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".part")
                torch.save(latent, tmp)
                tmp.replace(path)
        self._memory[key] = latent
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)
        return latent, cached

    def get(self, case_id: str, modality: str, volume: Tensor) -> Tensor:
        """Latents (C * z, d, h, w) of one condition volume (C, D, H, W), encoded at most once."""
        return self.lookup(case_id, modality, volume)[0]


@torch.no_grad()
def latent_sample(
    model: nn.Module, codec: WanLatentCodec, condition_latents: dict[str, Tensor], target: str,
    target_channels: int, latent_grid: tuple[int, int, int], steps: int = 10, shift: float = 3.0,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Sample the target in latent space with the DiT and decode it: (B, C_t, D, H, W) in [-1, 1].

    Args:
        model: Any2AnyDiT whose ``in_channels`` are latent channels (C_m * z_dim).
        condition_latents: {m: (B, C_m * z, d, h, w)} e.g. from :class:`ConditionLatentCache`.
        target: modality to generate; target_channels: its voxel channels C_t.
        latent_grid: (d, h, w) from ``codec.latent_shape(crop)``.
        steps, shift: Euler steps and schedule shift (paper: 10 steps, shift 3).
        seeds: sample k starts from the noise of ``seeds[k]`` (``flow.sampler.seeded_noise``, as in
            voxel space); default ``0 .. B - 1``.
    """
    batch = next(iter(condition_latents.values())).shape[0] if condition_latents else 1
    seeds = list(range(batch)) if seeds is None else [int(s) for s in seeds]
    device = next(model.parameters()).device
    conds = {m: v.to(device) for m, v in condition_latents.items()}
    z0 = sample_with_seeds(model, conds, target, (target_channels * codec.z_dim, *latent_grid), seeds,
                           steps=steps, shift=shift, device=device)
    return codec.decode(z0)
