"""benchmarks/baselines.py: the label-mean CT and the PTV atlas, checked against what they are defined to be."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from baselines import BODY, OAR, OUTSIDE, PTV, LabelMeanCT, PTVAtlas, voxel_classes  # noqa: E402

from diffkt3d.data.synthetic import make_synthetic_case  # noqa: E402


def test_label_mean_ct_is_the_mean_training_hu_of_each_class():
    cases = [make_synthetic_case(seed=s) for s in (0, 1)]
    fitted = LabelMeanCT.fit(cases)
    labels = [voxel_classes(c) for c in cases]
    for cls in (OUTSIDE, BODY, OAR, PTV):
        hu = np.concatenate([c.ct_hu[lab == cls] for c, lab in zip(cases, labels, strict=True)])
        assert fitted.means_hu[cls] == pytest.approx(float(hu.mean()), rel=1e-5)
    case = cases[0]
    pred = fitted.predict(case)
    assert pred.shape == case.grid.shape
    ptv = case.targets["PTV70"].mask & case.body
    cord = case.structures["SpinalCord"].mask & ~case.targets["PTV70"].mask & ~case.targets["PTV56"].mask
    assert np.all(pred[ptv] == np.float32(fitted.means_hu[PTV])) and np.all(pred[cord] == np.float32(fitted.means_hu[OAR]))
    assert np.all(pred[~case.body] == np.float32(fitted.means_hu[OUTSIDE]))


def test_label_mean_ct_needs_a_case_with_a_ct():
    case = make_synthetic_case()
    case.ct_hu = None
    with pytest.raises(ValueError, match="no training case with a CT"):
        LabelMeanCT.fit([case])


def test_the_atlas_of_identical_cases_returns_their_ptv():
    """Every training case has the same PTV70 in the same body: the atlas is that mask (up to the
    resampling to 32^3 and back at the edges)."""
    cases = [make_synthetic_case(seed=s) for s in (0, 1, 2)]
    atlas = PTVAtlas.fit(cases)
    ref = cases[0].targets["PTV70"].mask
    pred = atlas.predict(cases[0])
    assert pred.shape == ref.shape and not pred[~cases[0].body].any()
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert dice > 0.85 and atlas.cases == 3 and 0.05 <= atlas.threshold <= 0.95


def test_the_atlas_follows_the_body_box():
    """A case whose body (and PTV) moved within the grid gets the atlas moved with it."""
    case = make_synthetic_case(shape=(48, 48, 32))  # the body spans i = 4..44: room to move
    atlas = PTVAtlas.fit([case])
    moved = make_synthetic_case(shape=(48, 48, 32))
    moved.body = np.roll(case.body, 3, axis=0)
    assert not moved.body[:3].any()  # moved, not wrapped round
    for s in moved.structures.values():
        s.mask = np.roll(s.mask, 3, axis=0)
    pred, ref = atlas.predict(moved), moved.targets["PTV70"].mask
    assert 2 * (pred & ref).sum() / (pred.sum() + ref.sum()) > 0.85


def test_the_atlas_needs_cases_with_the_ptv():
    case = make_synthetic_case()
    del case.structures["PTV70"]
    with pytest.raises(ValueError, match="no training case has PTV70"):
        PTVAtlas.fit([case])
