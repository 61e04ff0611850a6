"""A latent-space checkpoint (frozen Wan VAE) behind the ``Predictor`` interface.

A checkpoint trained by ``diffkt3d.training.distributed`` with a ``wan.vae_dir`` runs its DiT on the
latents of a frozen Wan VAE; its ``meta["latent"]`` records the VAE's fingerprint, the voxel crop
(D, H, W in clip order) and z_dim. ``Predictor.load`` reads that entry and returns a
:class:`LatentPredictor`, so the CLI, the server tasks and the benchmarks only name the VAE folder;
the checkpoint, not the caller, decides which path runs.

Per request, after the Predictor has encoded the case's conditions on its working grid (exactly as
for a voxel model, plates included):

1. crop around the PTV centre with the training crop (``models.wan_vae.crop_clips``);
2. VAE-encode each condition, or take it from the per-case cache (content hash: a preview after a
   dose request, or a second candidate, encodes nothing that did not change);
3. Euler-sample the target latents with the shared seeded sampler (bf16 autocast on CUDA with the
   DiT's fp32 islands, fp32 on the CPU);
4. VAE-decode each sample (fp32, autocast off) and put it back into the working grid (-1 = empty:
   0 Gy, air, no structure outside the crop);

then the Predictor's own decode to the case grid (Gy, HU or masks), Scorecard and DVH follow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffkt3d.data.case import Case
from diffkt3d.errors import ConfigError
from diffkt3d.flow.sampler import StepCallback, sample_with_seeds
from diffkt3d.inference.predictor import Predictor
from diffkt3d.inference.result import DosePrediction, ImputationResult
from diffkt3d.models.checkpoint import ModelBundle
from diffkt3d.models.wan_vae import (
    CASE_TO_CLIP_AXES,
    ConditionLatentCache,
    WanLatentCodec,
    crop_clips,
    uncrop,
)

__all__ = ["LatentSpec", "LatentPredictor"]

log = logging.getLogger(__name__)

VAE_DIR_HINT = "diffkt3d predict/impute --vae-dir DIR; server: --conf vae_dir DIR"


@dataclass(frozen=True)
class LatentSpec:
    """What a latent checkpoint needs from its VAE (``meta["latent"]``, written by the trainer).

    Args:
        vae_fingerprint: :meth:`WanLatentCodec.fingerprint` of the VAE the DiT was trained with.
        crop: (D, H, W) voxel crop in clip order (slices, y, x) around the PTV centre.
        z_dim: latent channels per voxel channel.
    """

    vae_fingerprint: str
    crop: tuple[int, int, int]
    z_dim: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str) -> LatentSpec | None:
        """The checkpoint's latent entry, or None for a voxel-space checkpoint.

        Raises:
            ConfigError: the entry exists but lacks a field or has a malformed one.
        """
        entry = meta.get("latent")
        if entry is None:
            return None
        try:
            crop = tuple(int(v) for v in entry["crop"])
            if len(crop) != 3:
                raise ValueError
            return cls(vae_fingerprint=str(entry["vae_fingerprint"]), crop=crop, z_dim=int(entry["z_dim"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"checkpoint {source}: meta['latent'] must hold vae_fingerprint, crop (3 voxel "
                              f"sizes) and z_dim; found {entry!r}") from None


@dataclass
class _LatentCall:
    """What one prediction did in latent space (reported with its result)."""

    case_id: str
    encoded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 4)


class LatentPredictor(Predictor):
    """``Predictor`` for a latent-space checkpoint; its VAE must be the one it was trained with.

    Sequential calls only (the server serialises predictions): the per-request record of which
    conditions were cached lives on the instance while a call runs.

    Args:
        bundle: the loaded checkpoint (DiT with latent ``in_channels``).
        device: where the DiT and the VAE run.
        codec: the frozen VAE, checked against ``spec``.
        spec: the checkpoint's latent entry.
        cache: condition latents per case (default: in memory).
    """

    def __init__(self, bundle: ModelBundle, device: torch.device, codec: WanLatentCodec, spec: LatentSpec,
                 cache: ConditionLatentCache | None = None):
        super().__init__(bundle, device)
        self.codec = codec
        self.spec = spec
        self.cache = cache or ConditionLatentCache(codec)
        self.latent_grid = codec.latent_shape(spec.crop)
        self._call: _LatentCall | None = None

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, device: torch.device, vae_dir: str | Path | None,
                    cache_dir: str | Path | None = None, source: str = "") -> LatentPredictor:
        """Load the VAE from ``vae_dir`` and check it is the checkpoint's.

        Raises:
            ConfigError: no VAE folder given, the folder holds no loadable VAE, or the VAE is not
                the one the checkpoint was trained with (fingerprint, z_dim, crop or channels).
        """
        spec = LatentSpec.from_meta(bundle.meta, source)
        if spec is None:
            raise ConfigError(f"checkpoint {source} is a voxel-space model (no meta['latent']); load it with Predictor")
        if vae_dir is None:
            raise ConfigError(f"checkpoint {source} runs in the latent space of a Wan VAE (fingerprint "
                              f"{spec.vae_fingerprint}, crop {list(spec.crop)}): give the VAE folder it was "
                              f"trained with ({VAE_DIR_HINT})")
        codec = WanLatentCodec.from_pretrained(vae_dir, device=device)
        check_vae_matches(bundle, codec, spec, source, str(vae_dir))
        cache = ConditionLatentCache(codec, cache_dir)
        log.info("latent-space model: VAE %s (%s), crop %s -> latents %s", spec.vae_fingerprint, vae_dir,
                 spec.crop, codec.latent_shape(spec.crop))
        return cls(bundle, device, codec, spec, cache)

    # -- the latent path: crop, encode (cached), sample, decode, uncrop ---------------------------
    def _sample(self, conditions: dict[str, torch.Tensor], target: str, seeds: list[int], steps: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
        """(len(seeds), C, *grid) samples on the CPU in the working grid's [-1, 1] encoding."""
        call = self._call or _LatentCall(case_id="case")
        t0 = time.perf_counter()
        crops, start = crop_clips({m: v[0] for m, v in conditions.items()}, self.spec.crop)
        latents = {}
        for m, vol in crops.items():
            z, cached = self.cache.lookup(call.case_id, m, vol)
            latents[m] = z[None].to(self.device)
            (call.cached if cached else call.encoded).append(m)
        t1 = time.perf_counter()
        shape = (self.model.config.in_channels[target], *self.latent_grid)
        z0 = sample_with_seeds(self.model, latents, target, shape, seeds, steps=steps,
                               shift=self.bundle.flow_shift, device=self.device, on_step=on_step)
        t2 = time.perf_counter()
        working = tuple(self.encoding.grid[a - 1] for a in CASE_TO_CLIP_AXES[1:])  # (z, y, x)
        # One sample at a time: a full-size decode is the largest activation of the request.
        x0 = torch.stack([uncrop(self.codec.decode(z0[k : k + 1])[0].cpu(), start, working)
                          .permute(*CASE_TO_CLIP_AXES) for k in range(z0.shape[0])])  # (B, C, I, J, K)
        t3 = time.perf_counter()
        call.add("vae_encode_s", t1 - t0)
        call.add("latent_sample_s", t2 - t1)
        call.add("vae_decode_s", t3 - t2)
        return x0

    def _report(self, call: _LatentCall) -> dict[str, Any]:
        return {"vae_fingerprint": self.spec.vae_fingerprint, "crop": list(self.spec.crop),
                "latent_grid": list(self.latent_grid), "conditions_encoded": sorted(set(call.encoded)),
                "conditions_cached": sorted(set(call.cached))}

    def predict_dose(self, case: Case, *args: Any, **kwargs: Any) -> DosePrediction:
        """``Predictor.predict_dose``; the result also says what the latent path did (``latent``)."""
        self._call = call = _LatentCall(case_id=case.case_id)
        try:
            pred = super().predict_dose(case, *args, **kwargs)
        finally:
            self._call = None
        pred.timings.update(call.timings)
        pred.latent = self._report(call)
        return pred

    def impute(self, case: Case, *args: Any, **kwargs: Any) -> ImputationResult:
        """``Predictor.impute`` in latent space (``latent`` as for the dose)."""
        self._call = call = _LatentCall(case_id=case.case_id)
        try:
            result = super().impute(case, *args, **kwargs)
        finally:
            self._call = None
        result.timings.update(call.timings)
        result.latent = self._report(call)
        return result


def check_vae_matches(bundle: ModelBundle, codec: WanLatentCodec, spec: LatentSpec, source: str, vae_name: str) -> None:
    """Raise ConfigError unless ``codec`` is the VAE the checkpoint's DiT was trained on."""
    found = codec.fingerprint()
    if found != spec.vae_fingerprint:
        raise ConfigError(f"the VAE in {vae_name} (fingerprint {found}) is not the one checkpoint {source} was "
                          f"trained with (fingerprint {spec.vae_fingerprint}): its latents would mean nothing to "
                          "this DiT; give the VAE folder of the training recipe (wan.vae_dir)")
    if codec.z_dim != spec.z_dim:
        raise ConfigError(f"the VAE in {vae_name} has z_dim {codec.z_dim}, checkpoint {source} expects {spec.z_dim}")
    try:
        codec.latent_shape(spec.crop)
    except ValueError as exc:
        raise ConfigError(f"checkpoint {source}: crop {list(spec.crop)} does not fit the VAE: {exc}") from None
    voxel_channels = bundle.encoding.channels()
    wrong = {m: c for m, c in bundle.model.config.in_channels.items()
             if m in voxel_channels and c != voxel_channels[m] * codec.z_dim}
    if wrong:
        raise ConfigError(f"checkpoint {source}: DiT input channels {wrong} are not voxel channels x z_dim "
                          f"{codec.z_dim} (expected {({m: voxel_channels[m] * codec.z_dim for m in wrong})})")
