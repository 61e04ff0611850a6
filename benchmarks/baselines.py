"""Simple baselines an imputation must beat to be worth its network.

- :class:`LabelMeanCT`: the CT from the structures alone, each voxel the mean training HU of its
  class (outside the body, body, OAR, PTV). A model that does not beat it has learned nothing
  about anatomy that the contours do not already say.
- :class:`PTVAtlas`: the highest-prescription PTV (PTV70 on OpenKBP) from geometry alone: the
  frequency with which training cases have it at each position of the body's bounding box
  (normalised to the unit cube), thresholded at the level that gives the training cases their
  best mean Dice. A PTV imputation that does not beat it has not read the tumour from the CT.

Both are fitted on training cases only and see exactly what the imputation sees (the target's
own files are never given to ``predict``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import zoom

from diffkt3d.data.case import Case

OUTSIDE, BODY, OAR, PTV = range(4)
CLASS_NAMES = ("outside the body", "body", "OAR", "PTV")
AIR_HU = -1000.0


def voxel_classes(case: Case) -> np.ndarray:
    """(I, J, K) int8: the class of each voxel from the body and structures (a PTV overrides an OAR)."""
    if case.body is None:
        raise ValueError(f"case {case.case_id}: the label-mean CT needs a body mask")
    out = np.where(case.body, BODY, OUTSIDE).astype(np.int8)
    for s in case.oars.values():
        out[s.mask & case.body] = OAR
    for s in case.targets.values():
        out[s.mask & case.body] = PTV
    return out


@dataclass
class LabelMeanCT:
    """Mean training HU per voxel class (:data:`CLASS_NAMES`)."""

    means_hu: tuple[float, float, float, float]

    @classmethod
    def fit(cls, cases: Iterable[Case]) -> LabelMeanCT:
        sums, counts = np.zeros(4), np.zeros(4)
        for case in cases:
            if case.ct_hu is None or case.body is None:
                continue
            labels = voxel_classes(case)
            sums += np.bincount(labels.ravel(), weights=case.ct_hu.ravel().astype(np.float64), minlength=4)
            counts += np.bincount(labels.ravel(), minlength=4)
        if not counts[BODY]:
            raise ValueError("no training case with a CT and a body mask to fit the label-mean CT on")
        means = np.where(counts > 0, sums / np.maximum(counts, 1), AIR_HU)
        return cls(tuple(float(v) for v in means))

    def predict(self, case: Case) -> np.ndarray:
        """(I, J, K) float32 HU."""
        return np.asarray(self.means_hu, np.float32)[voxel_classes(case)]


def body_box(case: Case) -> tuple[slice, ...]:
    """The bounding box of the body mask."""
    if case.body is None or not case.body.any():
        raise ValueError(f"case {case.case_id}: the PTV atlas needs a non-empty body mask")
    idx = np.argwhere(case.body)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0), strict=True))


def _resize(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    factors = [n / s for n, s in zip(shape, volume.shape, strict=True)]
    out = zoom(volume.astype(np.float32), factors, order=1, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, n) for n in shape)]


@dataclass
class PTVAtlas:
    """Frequency of the PTV named ``name`` in body-box coordinates, and the threshold that selects it."""

    name: str
    frequency: np.ndarray  # (n, n, n) in [0, 1]
    threshold: float
    cases: int

    @classmethod
    def fit(cls, cases: Iterable[Case], name: str = "PTV70", size: int = 32,
            thresholds: Iterable[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))) -> PTVAtlas:
        used = [c for c in cases if name in c.targets and c.body is not None and c.body.any()]
        if not used:
            raise ValueError(f"no training case has {name} and a body mask to fit the atlas on")
        frequency = np.zeros((size,) * 3, np.float32)
        for case in used:
            box = body_box(case)
            frequency += _resize(case.targets[name].mask[box], (size,) * 3)
        atlas = cls(name, frequency / len(used), 0.5, len(used))
        best = max(thresholds, key=lambda t: np.mean([_dice(atlas.predict(c, t), c.targets[name].mask) for c in used]))
        atlas.threshold = float(best)
        return atlas

    def predict(self, case: Case, threshold: float | None = None) -> np.ndarray:
        """(I, J, K) bool: the atlas placed on the case's body box, thresholded, inside the body."""
        box = body_box(case)
        shape = tuple(s.stop - s.start for s in box)
        out = np.zeros(case.grid.shape, bool)
        out[box] = _resize(self.frequency, shape) >= (self.threshold if threshold is None else threshold)
        return out & case.body


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


__all__ = ["CLASS_NAMES", "LabelMeanCT", "PTVAtlas", "body_box", "voxel_classes"]
