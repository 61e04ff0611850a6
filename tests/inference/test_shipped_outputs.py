"""The shipped model's outputs on sample case pt_201 stay what they were when the reference was taken.

Refactors of the model, the sampler, the encoding or the decoding must not change what a clinician
gets. The reference holds 8^3 block means (a few kB, robust to last-bit differences between CPUs);
`benchmarks/output_identity.py` is the byte-for-byte check on one machine. Regenerate the reference
only for an intended change of behaviour (a new shipped model):
    python tests/inference/test_shipped_outputs.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).parent / "data" / "shipped_outputs_pt_201.npz"
BLOCK = 8


def block_means(volume: np.ndarray) -> np.ndarray:
    d, h, w = (s // BLOCK * BLOCK for s in volume.shape)
    v = volume[:d, :h, :w].astype(np.float64)
    return v.reshape(d // BLOCK, BLOCK, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3, 5))


def shipped_outputs() -> dict[str, np.ndarray]:
    import torch

    from diffkt3d.inference import Predictor
    from diffkt3d.io.case_folder import load_case_folder

    torch.set_num_threads(1)
    predictor = Predictor.load(None, device="cpu")
    case = load_case_folder(REPO / "sample-data" / "pt_201", with_dose=False)
    pred = predictor.predict_dose(case, steps=10, candidates=2, seed=0)
    out = {"dose10": block_means(pred.dose_gy), "cand1": block_means(pred.candidates[1].dose_gy),
           "preview": block_means(predictor.predict_dose(case, preview=True, seed=3).dose_gy)}
    ct = predictor.impute(load_case_folder(REPO / "sample-data" / "pt_201"), "ct", steps=10, seed=0).ct_hu
    out["impute_ct"] = block_means(ct)
    return out


@pytest.mark.slow
def test_shipped_model_outputs_match_the_reference():
    ref = np.load(REFERENCE)
    got = shipped_outputs()
    assert sorted(got) == sorted(ref.files)
    for key, atol in (("dose10", 1e-3), ("cand1", 1e-3), ("preview", 1e-3), ("impute_ct", 0.05)):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=atol, err_msg=f"{key} changed")
    # The guard can fail: the two candidates differ by far more than the tolerance.
    assert np.abs(ref["dose10"] - ref["cand1"]).max() > 0.1 or np.abs(ref["dose10"] - ref["preview"]).max() > 0.1


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **shipped_outputs())
    print(f"wrote {REFERENCE}")
