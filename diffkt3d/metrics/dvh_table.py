"""The DVH table of a dose: a fixed set of DVH metrics (Gy) for every structure of a case.

What the CLI's scorecard.json and the server's `dose` response report under ``"dvh"``
(docs/request-format.md). The metrics themselves are :mod:`diffkt3d.metrics.dvh`'s; this module
only picks which ones a planner reads first and names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffkt3d.data.case import Case
from diffkt3d.metrics import dvh

# Digits kept in the JSON form: 1e-4 Gy / cc is far below any clinical tolerance and keeps the
# response readable.
DVH_TABLE_DECIMALS = 4


@dataclass(frozen=True)
class StructureDvh:
    """DVH summary of one structure on a dose: doses in Gy, volume in cc."""

    Dmean: float
    Dmax: float
    Dmin: float
    D95: float
    D99: float
    D1: float
    D0_1cc: float
    volume_cc: float

    @classmethod
    def of(cls, dose_gy: np.ndarray, mask: np.ndarray, voxel_cc: float) -> StructureDvh:
        """Metrics of the (non-empty) ``mask`` on ``dose_gy`` (same shape); ``voxel_cc`` = one voxel in cc."""
        # The structure's voxel doses are gathered once, (N,): each metric on the full grid would
        # gather them again, seconds per case on a 128^3 grid. Same values, the same functions.
        d = dvh.structure_doses(dose_gy, mask)
        every = np.ones(d.shape, dtype=bool)
        return cls(
            Dmean=dvh.mean_dose(d, every), Dmax=dvh.max_dose(d, every), Dmin=dvh.min_dose(d, every),
            D95=dvh.dose_at_volume_pct(d, every, 95.0), D99=dvh.dose_at_volume_pct(d, every, 99.0),
            D1=dvh.dose_at_volume_pct(d, every, 1.0), D0_1cc=dvh.dose_at_volume_cc(d, every, 0.1, voxel_cc),
            volume_cc=float(d.size) * voxel_cc)

    def to_dict(self) -> dict[str, float]:
        """JSON form, keyed by the metric names of :func:`diffkt3d.metrics.dvh.parse_metric`."""
        values = {"Dmean": self.Dmean, "Dmax": self.Dmax, "Dmin": self.Dmin, "D95%": self.D95, "D99%": self.D99,
                  "D1%": self.D1, "D0.1cc": self.D0_1cc, "volume_cc": self.volume_cc}
        return {k: round(v, DVH_TABLE_DECIMALS) for k, v in values.items()}


def dvh_table(dose_gy: np.ndarray, case: Case) -> dict[str, StructureDvh]:
    """Structure name -> :class:`StructureDvh` of ``dose_gy`` (Gy, on the case grid), in the case's
    structure order; empty structures are left out (a DVH of no voxels has no value).

    Raises:
        ValueError: the dose is not on the case grid (names both shapes).
    """
    dose = np.asarray(dose_gy)
    if tuple(dose.shape) != tuple(case.grid.shape):
        raise ValueError(f"case {case.case_id}: DVH table of a dose of shape {tuple(dose.shape)}, expected the "
                         f"case grid {tuple(case.grid.shape)}")
    voxel_cc = case.grid.voxel_volume_mm3 / 1000.0
    return {name: StructureDvh.of(dose, s.mask, voxel_cc) for name, s in case.structures.items() if s.mask.any()}


def dvh_table_dict(table: dict[str, StructureDvh]) -> dict[str, dict[str, float]]:
    """JSON form of a :func:`dvh_table` result."""
    return {name: row.to_dict() for name, row in table.items()}


__all__ = ["DVH_TABLE_DECIMALS", "StructureDvh", "dvh_table", "dvh_table_dict"]
