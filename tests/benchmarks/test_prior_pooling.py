"""benchmarks/prior_pooling.py: its prior under the shipped pooling is the dose benchmark's prior-only row, and
max pooling never lowers the prescription map, so it never lowers the prior."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_prior_pooling_agrees_with_the_dose_benchmark_and_max_is_not_lower(openkbp_root: Path) -> None:
    from dose_benchmark import prior_dose
    from prior_pooling import prior_doses

    from diffkt3d.inference import Predictor

    predictor = Predictor.load(None)
    folder = openkbp_root / "validation" / "pt_201"
    doses = prior_doses(predictor, folder)
    assert set(doses) == {"area", "max"}
    np.testing.assert_array_equal(doses[predictor.encoding.ptv_resampling], prior_dose(predictor, folder))
    # The spread is monotone in Rx and the decode is monotone, so a larger map gives a larger prior.
    assert np.all(doses["max"] >= doses["area"] - 1e-4)
    assert float((doses["max"] - doses["area"]).max()) > 1.0  # and the PTV edges do gain dose
