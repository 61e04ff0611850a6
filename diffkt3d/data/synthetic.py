"""A small analytic phantom case: for tests, smoke runs and examples (no patient data needed).

A body cylinder with a spherical PTV70 inside a PTV56 shell, a spinal cord and a parotid, and a
smooth dose (Gaussian-blurred prescription map) whose DVH values are known in shape: high in the
PTVs, low in the distant OAR.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure


def make_synthetic_case(shape=(32, 32, 32), spacing=(3.0, 3.0, 2.5), case_id="synthetic", seed=0) -> Case:
    """A body cylinder with a spherical PTV70 inside a PTV56 shell, two OARs and a smooth dose.

    The dose is a Gaussian-blurred prescription map, so DVH values are known to be high in the
    PTVs and low in the distant OAR.
    """
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [s / 2 for s in shape]
    r_body = np.hypot(i - c[0], j - c[1])
    body = r_body < shape[0] * 0.42
    r = np.sqrt((i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2)
    ptv70 = r < 4
    ptv56 = (r >= 4) & (r < 7)
    cord = (np.hypot(i - c[0] - 9, j - c[1]) < 2) & body
    parotid = (np.sqrt((i - c[0] + 6) ** 2 + (j - c[1] - 8) ** 2 + (k - c[2]) ** 2) < 3) & body
    ct = np.where(body, 40.0 + rng.normal(0, 20, shape), -1000.0).astype(np.float32)
    ct[cord] = 300.0
    rx = np.where(ptv70, 70.0, np.where(ptv56, 56.0, 0.0))
    dose = gaussian_filter(rx, 2.0) * 1.05
    dose = np.where(body, dose, 0.0).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    grid = Grid(shape=tuple(shape), affine=affine)
    structures = {
        "PTV70": Structure("PTV70", ptv70, "target", 70.0),
        "PTV56": Structure("PTV56", ptv56, "target", 56.0),
        "SpinalCord": Structure("SpinalCord", cord, "oar"),
        "LeftParotid": Structure("LeftParotid", parotid, "oar"),
    }
    iso = tuple(float(v) for v in grid.index_to_world(np.array(c))[0])
    plan = Plan(beams=BeamGeometry([0.0, 120.0, 240.0], iso, "IMRT"), fractions=35)
    return Case(case_id=case_id, grid=grid, ct_hu=ct, dose_gy=dose, body=body, structures=structures, plan=plan)
