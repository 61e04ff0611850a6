"""Geometric augmentation of an encoded case: left-right flip, rotation about the cranio-caudal
axis, shift; the same transform on every modality of the case.

Why these three: they are the OpenKBP challenge winner's augmentation (cascaded 3D U-Nets), and
they keep a plan physically consistent. The beam and angle plates are drawn in the image, so they
turn and mirror with the anatomy; a mirrored patient irradiated by mirrored beams receives the
mirrored dose. Two things need care:

- a left-right flip moves each paired organ to the other side, so the channels of a Left/Right
  pair (the parotids) are swapped: the "LeftParotid" channel must still hold the patient's left
  parotid;
- rotation is in the axial plane of the working grid, whose two in-plane axes have the same
  spacing on OpenKBP (3.9 mm) and on every grid this project encodes isotropically in-plane; a
  rotation in index space is then a rotation in millimetres.

Encoded volumes lie in [-1, 1] with -1 meaning empty (air, outside a mask, 0 Gy), so voxels
brought in from outside the grid are filled with -1. Everything is resampled trilinearly; masks
and plates are soft fractions on the working grid already.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Axes of an encoded (C, D, H, W) volume (diffkt3d.data.plates: OpenKBP axis 0 runs anterior ->
# posterior, axis 1 right -> left, axis 2 superior -> inferior).
LEFT_RIGHT_AXIS = 1


@dataclass(frozen=True)
class Augmentation:
    """How strongly to augment; all zero (the default) = no augmentation.

    Args:
        flip_lr: probability of a left-right mirror (with Left/Right channel pairs swapped).
        rotate_deg: rotation about the cranio-caudal axis, drawn uniformly in [-rotate_deg, rotate_deg].
        shift_voxels: shift along each axis, drawn uniformly in [-shift_voxels, shift_voxels]
            working-grid voxels.
    """

    flip_lr: float = 0.0
    rotate_deg: float = 0.0
    shift_voxels: float = 0.0

    @property
    def active(self) -> bool:
        return self.flip_lr > 0 or self.rotate_deg > 0 or self.shift_voxels > 0


def mirrored_channels(names: tuple[str, ...]) -> list[int]:
    """Channel order after a left-right mirror: each Left*/Right* name takes its partner's index."""
    order = list(range(len(names)))
    for i, name in enumerate(names):
        for a, b in (("Left", "Right"), ("Right", "Left")):
            if a in name and name.replace(a, b) in names:
                order[i] = names.index(name.replace(a, b))
    return order


def augment_case(tensors: dict[str, torch.Tensor], aug: Augmentation, rng: random.Random,
                 oar_channels: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One random draw of ``aug`` applied to every modality of one case.

    Args:
        tensors: {modality: (C, D, H, W)} in the [-1, 1] encoding (any float dtype).
        aug: the augmentation strengths.
        rng: the draw's random source (the trainer's, so a resumed run continues its sequence).
        oar_channels: names of the ``oar`` channels, to swap Left/Right pairs on a mirror.

    Returns:
        a new dict, float32, same shapes; the input when ``aug`` is inactive.
    """
    if not aug.active:
        return tensors
    flip = rng.random() < aug.flip_lr
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg)) if aug.rotate_deg > 0 else 0.0
    shift = [rng.uniform(-aug.shift_voxels, aug.shift_voxels) if aug.shift_voxels > 0 else 0.0
             for _ in range(3)]
    names = list(tensors)
    stacked = torch.cat([tensors[m].float() for m in names])  # (C_total, D, H, W)
    if flip:
        stacked = stacked.flip(1 + LEFT_RIGHT_AXIS)  # dim 0 is the channel
        if "oar" in tensors and oar_channels:
            offset = sum(tensors[m].shape[0] for m in names[: names.index("oar")])
            order = mirrored_channels(tuple(oar_channels))
            idx = list(range(stacked.shape[0]))
            idx[offset: offset + len(order)] = [offset + j for j in order]
            stacked = stacked[idx]
    if angle or any(shift):
        stacked = _rotate_shift(stacked, angle, shift)
    out, start = {}, 0
    for m in names:
        c = tensors[m].shape[0]
        out[m] = stacked[start: start + c]
        start += c
    return out


def _rotate_shift(x: torch.Tensor, angle: float, shift: list[float]) -> torch.Tensor:
    """Rotate (C, D, H, W) by ``angle`` in the (D, H) plane and shift by ``shift`` voxels (D, H, W).

    ``affine_grid`` coordinates are (x, y, z) = (W, H, D) in [-1, 1]; the output voxel at p samples
    the input at R p - t. Outside the grid the value is -1 (empty in every encoding). The d / h
    factors make it a rotation in voxels when D != H.
    """
    _, d, h, w = x.shape
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[1.0, 0.0, 0.0, -2.0 * shift[2] / w],
                          [0.0, cos, -sin * d / h, -2.0 * shift[1] / h],
                          [0.0, sin * h / d, cos, -2.0 * shift[0] / d]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, x.shape[0], d, h, w], align_corners=False)
    moved = F.grid_sample((x + 1.0)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved[0] - 1.0


__all__ = ["Augmentation", "LEFT_RIGHT_AXIS", "augment_case", "mirrored_channels"]
