"""Case <-> model tensors: every modality scaled to [-1, 1] on the model's working grid.

The paper scales every modality to [-1, 1] (supplement B.1). We fix how each modality becomes
channels here, once, so training, inference, the server and benchmarks agree:

- ct: HU clipped to CT_WINDOW_HU, mapped linearly to [-1, 1] (1 channel);
- ptv: prescription map (each target voxel holds its Rx in Gy) / DOSE_SCALE_GY (1 channel), so the
  model sees dose levels, not just "target";
- oar: one channel per name in `oar_channels` (fixed order, stored in the checkpoint);
- body, angle: binary masks; beam: plate / its maximum;
- dose: Gy / DOSE_SCALE_GY.
Masks map {0, 1} -> {-1, 1}. The working grid is reached with area (average) resampling, which
for OpenKBP 128^3 -> 64^3 is exact 2x2x2 averaging; results go back with trilinear upsampling.

The prescription map is the exception (``EncodingConfig.ptv_resampling``): it is max-pooled, so a
working voxel that holds any target voxel carries that target's full Rx. Area-averaging gave edge
voxels a fraction of the Rx and the dose prior (``models.dose_prior``) then started its falloff
inside the target: on the 40 validation cases the prior alone scores Scorecard 52.5 area-averaged
vs 72.1 max-pooled, DVH score 8.42 vs 7.14 Gy (benchmarks/results/prior_pooling.md). Checkpoints
written before this field existed were trained on area-averaged maps and load as "area".

Dose is resampled *inside the body only* (normalised averaging/interpolation with the body mask as
weight): plain averaging mixes the zero dose outside the skin into edge voxels and, measured on
OpenKBP pt_1 / pt_201, the 128^3 -> 64^3 -> 128^3 round trip of the reference dose alone scores
2.57 / 1.50 Gy (OpenKBP dose score) plain vs 1.11 / 0.80 Gy body-normalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffkt3d.constants import CT_WINDOW_HU, DOSE_SCALE_GY, MODALITIES, OPENKBP_OARS
from diffkt3d.data.case import Case, Grid
from diffkt3d.errors import CaseError

PTV_RESAMPLING = ("max", "area")


@dataclass
class EncodingConfig:
    """How cases become model inputs. Stored in every checkpoint, so a model is always fed as it was trained.

    Args:
        grid: working grid (D, H, W) voxels every modality is resampled to.
        oar_channels: OAR names, one channel each, in this order.
        ct_window_hu: HU range mapped to [-1, 1].
        dose_scale_gy: Gy mapped to +1 for dose and ptv.
        ptv_resampling: "max" (max-pool the prescription map to the working grid) or "area".
    """

    grid: tuple[int, int, int] = (64, 64, 64)
    oar_channels: tuple[str, ...] = OPENKBP_OARS
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    dose_scale_gy: float = DOSE_SCALE_GY
    modalities: tuple[str, ...] = field(default=MODALITIES)
    ptv_resampling: str = "max"

    def __post_init__(self) -> None:
        if self.ptv_resampling not in PTV_RESAMPLING:
            raise ValueError(f"ptv_resampling must be one of {PTV_RESAMPLING}, got {self.ptv_resampling!r}")

    def channels(self) -> dict[str, int]:
        return {m: (len(self.oar_channels) if m == "oar" else 1) for m in self.modalities}

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> EncodingConfig:
        return cls(grid=tuple(d["grid"]), oar_channels=tuple(d["oar_channels"]),
                   ct_window_hu=tuple(d["ct_window_hu"]), dose_scale_gy=float(d["dose_scale_gy"]),
                   modalities=tuple(d.get("modalities", MODALITIES)),
                   # Older checkpoints predate the field; they were trained on area-averaged maps.
                   ptv_resampling=d.get("ptv_resampling", "area"))


def _to_unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] as float32 tensor."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    return t * 2.0 - 1.0


def resample(volume: torch.Tensor, size: tuple[int, int, int], *, smooth_down: bool = True) -> torch.Tensor:
    """(C, D, H, W) -> (C, *size). Area averaging when shrinking, trilinear otherwise."""
    if tuple(volume.shape[1:]) == tuple(size):
        return volume
    x = volume[None]
    shrink = all(s_out <= s_in for s_out, s_in in zip(size, volume.shape[1:], strict=True))
    if shrink and smooth_down:
        x = F.interpolate(x, size=size, mode="area")
    else:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0]


def available_modalities(case: Case, cfg: EncodingConfig) -> tuple[str, ...]:
    out = []
    for m in cfg.modalities:
        if m == "oar":
            if any(n in case.oars for n in cfg.oar_channels):
                out.append(m)
        elif case.has(m):
            out.append(m)
    return tuple(out)


def encode_modality(case: Case, modality: str, cfg: EncodingConfig) -> torch.Tensor:
    """One modality of a case as a (C, D, H, W) float32 tensor in [-1, 1] on the working grid."""
    if modality == "ct":
        if case.ct_hu is None:
            raise CaseError("CT is missing", case=case.case_id)
        lo, hi = cfg.ct_window_hu
        unit = (np.clip(case.ct_hu, lo, hi) - lo) / (hi - lo)
    elif modality == "ptv":
        unit = np.clip(case.prescription_map_gy() / cfg.dose_scale_gy, 0.0, 1.0)
        if cfg.ptv_resampling == "max":
            return _to_unit(_max_downsample(torch.as_tensor(unit, dtype=torch.float32)[None], cfg.grid))
    elif modality == "oar":
        empty = np.zeros(case.grid.shape, dtype=np.float32)
        unit = np.stack([case.structures[n].mask.astype(np.float32) if n in case.oars else empty
                         for n in cfg.oar_channels])
    elif modality == "body":
        if case.body is None:
            raise CaseError("body mask is missing", case=case.case_id)
        unit = case.body.astype(np.float32)
    elif modality == "beam":
        if case.beam_plate is None:
            raise CaseError("beam plate is missing", case=case.case_id)
        peak = float(case.beam_plate.max())
        unit = case.beam_plate / peak if peak > 0 else case.beam_plate
    elif modality == "angle":
        if case.angle_plate is None:
            raise CaseError("angle plate is missing", case=case.case_id)
        unit = (case.angle_plate > 0).astype(np.float32)
    elif modality == "dose":
        if case.dose_gy is None:
            raise CaseError("dose is missing", case=case.case_id)
        unit = np.clip(case.dose_gy / cfg.dose_scale_gy, 0.0, 1.0)
        if case.body is not None:
            return _to_unit(_masked_downsample(torch.as_tensor(unit)[None], case.body, cfg.grid))
    else:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    t = torch.as_tensor(np.asarray(unit, dtype=np.float32))
    if t.ndim == 3:
        t = t[None]
    return _to_unit(resample(t, cfg.grid))


def encode_case(case: Case, cfg: EncodingConfig, modalities: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """All requested (default: all available) modalities -> {modality: (C, D, H, W)}."""
    mods = available_modalities(case, cfg) if modalities is None else modalities
    return {m: encode_modality(case, m, cfg) for m in mods}


def _max_downsample(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(C, I, J, K) -> (C, *size) keeping each working voxel's maximum; trilinear when growing."""
    shrink = all(s_out <= s_in for s_out, s_in in zip(size, x.shape[1:], strict=True))
    if tuple(x.shape[1:]) == tuple(size) or not shrink:
        return resample(x, size)
    return F.adaptive_max_pool3d(x[None], size)[0]


def _masked_downsample(x: torch.Tensor, body: np.ndarray, size: tuple[int, int, int]) -> torch.Tensor:
    """(C, I, J, K) -> (C, *size): mean over body voxels only in each working voxel (0 outside)."""
    w = torch.as_tensor(body.astype(np.float32))[None]
    num = resample(x * w, size)
    den = resample(w, size)
    return torch.where(den > 0, num / den.clamp_min(1e-6), torch.zeros_like(num))


def _masked_upsample(x: torch.Tensor, body: np.ndarray, grid: Grid) -> torch.Tensor:
    """(C, d, h, w) -> (C, I, J, K) interpolating only between working voxels that touch the body."""
    w_small = (resample(torch.as_tensor(body.astype(np.float32))[None], tuple(x.shape[1:])) > 0).float()
    num = resample(x.float() * w_small, grid.shape, smooth_down=False)
    den = resample(w_small, grid.shape, smooth_down=False)
    return torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))


def _to_case_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(C, d, h, w) working-grid tensor -> (C, I, J, K) on the case grid (trilinear)."""
    return resample(x.float(), grid.shape, smooth_down=False)


def decode_dose(x: torch.Tensor, grid: Grid, cfg: EncodingConfig, body: np.ndarray | None = None) -> np.ndarray:
    """(1, d, h, w) model output in [-1, 1] -> (I, J, K) float32 Gy, >= 0, zero outside the body.

    Zeroing outside the body mirrors the OpenKBP baseline (dose can only be deposited there).
    """
    unit = (x.float().clamp(-1, 1) + 1.0) * 0.5
    if body is None:
        return (_to_case_grid(unit, grid)[0] * cfg.dose_scale_gy).numpy().astype(np.float32)
    gy = _masked_upsample(unit, body, grid)[0] * cfg.dose_scale_gy
    return np.where(body, gy.numpy(), 0.0).astype(np.float32)


def decode_ct(x: torch.Tensor, grid: Grid, cfg: EncodingConfig) -> np.ndarray:
    lo, hi = cfg.ct_window_hu
    unit = (_to_case_grid(x, grid)[0].clamp(-1, 1) + 1.0) * 0.5
    return (lo + unit * (hi - lo)).numpy().astype(np.float32)


def decode_oar(x: torch.Tensor, grid: Grid, cfg: EncodingConfig) -> dict[str, np.ndarray]:
    """(C_oar, d, h, w) -> {name: bool mask}; a voxel belongs to an OAR when its channel > 0."""
    up = _to_case_grid(x, grid)
    return {name: (up[i] > 0).numpy() for i, name in enumerate(cfg.oar_channels)}


def decode_ptv(x: torch.Tensor, grid: Grid, cfg: EncodingConfig, prescriptions_gy: list[float]) -> dict[str, np.ndarray]:
    """(1, d, h, w) prescription map -> {f"PTV{rx:g}": mask}: each voxel snaps to the nearest level.

    Args:
        prescriptions_gy: the dose levels to recover (e.g. [56, 63, 70]); 0 means "not a target".
    """
    rx_map = ((_to_case_grid(x, grid)[0].clamp(-1, 1) + 1.0) * 0.5 * cfg.dose_scale_gy).numpy()
    levels = np.asarray([0.0, *sorted(prescriptions_gy)], dtype=np.float32)
    nearest = np.abs(rx_map[..., None] - levels).argmin(axis=-1)
    return {f"PTV{rx:g}": nearest == i + 1 for i, rx in enumerate(sorted(prescriptions_gy))}
