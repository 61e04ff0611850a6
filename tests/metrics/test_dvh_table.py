"""DVH table of a dose: every non-empty structure, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.metrics.dvh_table import dvh_table, dvh_table_dict


def _case() -> Case:
    shape = (12, 10, 8)
    grid = Grid(shape, np.diag([2.0, 2.0, 3.0, 1.0]))
    ptv, cord, empty = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    ptv[3:8, 3:7, 2:6] = True
    cord[9:11, 4:6, :] = True
    return Case("c1", grid, structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                                        "SpinalCord": Structure("SpinalCord", cord, "oar"),
                                        "Larynx": Structure("Larynx", empty, "oar")})


def test_dvh_table_against_numpy():
    case = _case()
    dose = np.random.default_rng(0).uniform(0, 70, size=case.grid.shape).astype(np.float32)
    table = dvh_table_dict(dvh_table(dose, case))
    assert list(table) == ["PTV70", "SpinalCord"]  # the empty Larynx has no DVH
    d = dose[case.structures["PTV70"].mask].astype(np.float64)
    row = table["PTV70"]
    assert row["Dmean"] == pytest.approx(d.mean(), abs=1e-4)
    assert (row["Dmax"], row["Dmin"]) == pytest.approx((d.max(), d.min()), abs=1e-4)
    assert row["D95%"] == pytest.approx(np.percentile(d, 5), abs=1e-4)
    assert row["D1%"] == pytest.approx(np.percentile(d, 99), abs=1e-4)
    assert row["D0.1cc"] == pytest.approx(np.sort(d)[-round(0.1 / 0.012)], abs=1e-4)  # 12 mm^3 voxels
    assert row["volume_cc"] == pytest.approx(d.size * 0.012, abs=1e-4)


def test_dvh_table_names_a_dose_off_the_case_grid():
    with pytest.raises(ValueError, match=r"case c1.*\(2, 2, 2\).*\(12, 10, 8\)"):
        dvh_table(np.zeros((2, 2, 2), np.float32), _case())
