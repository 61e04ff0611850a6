"""Running a full-resolution stage (``models.full_res``) on a case: the cascade's second half.

The same functions serve inference (``Predictor``) and the stage's trainer, so the coarse
prediction a stage is trained on is, to the bit, the one it is given when serving:

- :func:`coarse_on_case_grid`: the DiT's working-grid sample -> the continuous case-grid
  prediction in the [-1, 1] encoding, before any threshold (dose through the body-aware
  ``decode_dose``, the rest trilinear);
- :func:`stage_inputs`: the case's conditions encoded at full resolution;
- :func:`run_stage`: the U-Net over the whole case grid in windows of the training crop
  (``sliding_window_inference``), so memory stays bounded on a 128^3 grid;
- :func:`refine_dose` / :func:`refine_ct` / :func:`refine_masks`: results in Gy, HU and masks.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from diffkt3d.data.case import Case
from diffkt3d.data.encoding import (
    EncodingConfig,
    available_modalities,
    decode_ct,
    decode_dose,
    encode_modality,
    resample,
)
from diffkt3d.errors import CaseError
from diffkt3d.models.full_res import FullResStage, full_res_encoding, stage_conditions_tensor

# Overlap of the inference windows; Gaussian blending hides the seams between them.
WINDOW_OVERLAP = 0.25

__all__ = ["WINDOW_OVERLAP", "coarse_on_case_grid", "largest_component", "mirrored_condition_order", "refine_ct",
           "refine_dose", "refine_masks", "run_stage", "run_stage_flip_averaged", "stage_inputs"]


def coarse_on_case_grid(x0: torch.Tensor, target: str, case: Case, encoding: EncodingConfig) -> torch.Tensor:
    """(C, d, h, w) working-grid sample -> (C, I, J, K) float32 case-grid prediction in [-1, 1] units.

    Dose goes through ``decode_dose`` (body-aware upsampling, zero outside the body), exactly the
    dose a prediction without a stage returns; the other targets are upsampled trilinearly, as
    their decoders do before thresholding.
    """
    if target == "dose":
        gy = decode_dose(x0, case.grid, encoding, case.body)
        return torch.from_numpy(gy)[None] / encoding.dose_scale_gy * 2.0 - 1.0
    up = resample(x0.float(), case.grid.shape, smooth_down=False)
    return up.clamp(-1.0, 1.0) if target == "ct" else up


def stage_inputs(case: Case, stage: FullResStage) -> torch.Tensor:
    """(C, I, J, K) float32: the stage's conditions of ``case`` encoded on the case grid.

    Beam and angle plates are rasterised first when the stage reads them and the plan has beams.
    """
    cfg = stage.config
    if ("beam" in cfg.conditions or "angle" in cfg.conditions) and case.plan.beams is not None:
        from diffkt3d.data.plates import ensure_plates

        ensure_plates(case)
    enc = full_res_encoding(stage.encoding, case.grid.shape)
    present = set(available_modalities(case, enc))
    volumes = {m: encode_modality(case, m, enc) for m in cfg.conditions if m in present}
    return stage_conditions_tensor(volumes, cfg, stage.encoding, case.grid.shape)


@torch.no_grad()
def run_stage(stage: FullResStage, conditions: torch.Tensor, coarse: torch.Tensor | None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The stage's raw output (C, I, J, K) on the CPU, computed window by window.

    Windows are the training crop (a smaller grid is padded): the network sees inputs of the
    size it learned on, and the peak memory is a window's, not the whole grid's. Padding is -1,
    the empty value of every encoding, as in training crops.
    """
    x = stage.network_input(conditions[None].float(), None if coarse is None else coarse[None].float())
    out = sliding_window_inference(x.to(device), roi_size=stage.config.crop, sw_batch_size=1, predictor=stage.net,
                                   overlap=WINDOW_OVERLAP, mode="gaussian", cval=-1.0)
    return out[0].float().cpu()


def mirrored_condition_order(conditions: tuple[str, ...], oar_channels: tuple[str, ...]) -> list[int]:
    """Channel order of a stage's condition tensor after a left-right mirror: each Left/Right OAR
    channel takes its partner's place, so the "LeftParotid" channel still holds the left parotid."""
    from diffkt3d.training.augment import mirrored_channels

    order = list(range(sum(len(oar_channels) if m == "oar" else 1 for m in conditions)))
    if "oar" in conditions:
        start = sum(len(oar_channels) if m == "oar" else 1 for m in conditions[: conditions.index("oar")])
        order[start: start + len(oar_channels)] = [start + j for j in mirrored_channels(oar_channels)]
    return order


def run_stage_flip_averaged(stage: FullResStage, conditions: torch.Tensor, coarse: torch.Tensor | None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`run_stage` averaged with its run on the left-right mirrored case, mirrored back (the
    OpenKBP winner's test-time flip). Only for single-channel outputs (dose, CT): a mask stage
    would also need its output channels swapped."""
    from diffkt3d.training.augment import LEFT_RIGHT_AXIS

    if stage.config.target not in ("dose", "ct"):
        raise ValueError(f"test-time flip averaging is for dose and ct stages, not {stage.config.target}")
    dim = 1 + LEFT_RIGHT_AXIS  # (C, I, J, K)
    order = mirrored_condition_order(stage.config.conditions, stage.encoding.oar_channels)
    out = run_stage(stage, conditions, coarse, device)
    mirrored = run_stage(stage, conditions.flip(dim)[order], None if coarse is None else coarse.flip(dim), device)
    return 0.5 * (out + mirrored.flip(dim))


def _check_grid(case: Case, coarse: np.ndarray | torch.Tensor | None) -> None:
    if coarse is not None and tuple(coarse.shape[-3:]) != tuple(case.grid.shape):
        raise CaseError(f"coarse prediction has grid {tuple(coarse.shape[-3:])}, expected the case grid "
                        f"{tuple(case.grid.shape)}", case=case.case_id)


def refine_dose(stage: FullResStage, case: Case, coarse_gy: np.ndarray, conditions: torch.Tensor | None = None,
                device: torch.device | str = "cpu", flip_average: bool = False) -> np.ndarray:
    """(I, J, K) Gy: the coarse dose plus the stage's residual (or the peer's own dose), >= 0, zero
    outside the body. ``conditions``: :func:`stage_inputs` of the case, when already computed.
    ``flip_average``: the stage's output averaged over the case and its mirror (twice the time)."""
    _check_grid(case, coarse_gy)
    scale = stage.encoding.dose_scale_gy
    conditions = stage_inputs(case, stage) if conditions is None else conditions
    coarse = torch.from_numpy(np.asarray(coarse_gy, dtype=np.float32))[None] / scale * 2.0 - 1.0
    run = run_stage_flip_averaged if flip_average else run_stage
    out = run(stage, conditions, coarse, device)[0].numpy()
    if stage.residual:
        gy = coarse_gy + np.float32(0.5 * scale) * out  # a zero residual returns coarse_gy unchanged
    else:
        gy = (np.clip(out, -1.0, 1.0) + 1.0) * np.float32(0.5 * scale)
    gy = np.clip(gy, 0.0, scale)
    if case.body is not None:
        gy = np.where(case.body, gy, 0.0)
    return gy.astype(np.float32)


def refine_ct(stage: FullResStage, case: Case, x0: torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
    """(I, J, K) HU from the working-grid CT sample ``x0``: coarse HU + residual, air outside the body."""
    lo, hi = stage.encoding.ct_window_hu
    coarse_hu = decode_ct(x0, case.grid, stage.encoding)
    coarse = coarse_on_case_grid(x0, "ct", case, stage.encoding)
    out = run_stage(stage, stage_inputs(case, stage), coarse, device)[0].numpy()
    if stage.residual:
        hu = coarse_hu + np.float32(0.5 * (hi - lo)) * out
    else:
        hu = lo + (np.clip(out, -1.0, 1.0) + 1.0) * np.float32(0.5 * (hi - lo))
    hu = np.clip(hu, lo, hi)
    if case.body is not None:
        hu = np.where(case.body, hu, lo)
    return hu.astype(np.float32)


def mask_names(stage: FullResStage) -> list[str]:
    """Names of a mask stage's channels: the base encoding's OARs, or ``PTV<level>``."""
    if stage.config.target == "oar":
        return list(stage.encoding.oar_channels)
    return [f"PTV{level:g}" for level in stage.config.ptv_levels_gy]


def refine_masks(stage: FullResStage, case: Case, x0: torch.Tensor,
                 device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """{name: bool mask} on the case grid: the stage's logits > 0 (sigmoid > 0.5).

    Each OAR keeps only its largest connected component: every OpenKBP OAR is one organ (left and
    right parotids are separate channels), and a stray blob elsewhere, e.g. "brainstem" in the
    shoulder, is what a planner would have to delete by hand (it also dominates the 95 %
    Hausdorff distance). PTVs are left whole: a target may be several volumes.
    """
    coarse = coarse_on_case_grid(x0, stage.config.target, case, stage.encoding)
    logits = run_stage(stage, stage_inputs(case, stage), coarse, device)
    masks = {name: (logits[i] > 0).numpy() for i, name in enumerate(mask_names(stage))}
    if stage.config.target == "oar":
        masks = {name: largest_component(m) for name, m in masks.items()}
    return masks


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool mask (the mask itself when it has one or none)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())
