"""diffkt3d.io.image_guard: headers are judged before any voxel is read, and case loading uses it."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import pytest

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.image_guard import (
    DEFAULT_MAX_IMAGE_MB,
    MAX_IMAGE_MB_ENV,
    ImageLimits,
    check_nifti_complete,
    check_nifti_header,
)

sys.path.insert(0, str(Path(__file__).parent))
from hostile_files import nifti_bytes, nifti_header_only, rgb_nifti, truncated  # noqa: E402

LIMITS = ImageLimits()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_default_fits_a_large_clinical_ct_with_margin():
    clinical_ct_float32 = 512 * 512 * 400 * 4
    assert LIMITS.max_bytes >= 2 * clinical_ct_float32
    assert LIMITS.max_image_mb == DEFAULT_MAX_IMAGE_MB


@pytest.mark.parametrize("name, data, problem", [
    ("ct.nii", nifti_header_only((2000, 2000, 2000), "int16"), "MiB in memory"),
    ("ct.nii.gz", nifti_header_only((1000, 1000, 1000), "uint8", gz=True), "MiB in memory"),
    ("ct.nii.gz", nifti_bytes(np.zeros((4, 4, 4), np.complex64)), "complex64"),
    ("ct.nii.gz", rgb_nifti(), "compound"),
    ("ct.nii.gz", nifti_bytes(np.zeros((4, 4, 4, 3), np.float32)), "expected a 3D volume, found shape (4, 4, 4, 3)"),
    ("ct.nii.gz", nifti_bytes(np.zeros((4, 4), np.float32)), "expected a 3D volume"),
    ("ct.nii", nifti_header_only((5000, 2, 2), "uint8"), "outside 1..4096"),
    ("ct.nii.gz", b"not a nifti at all", "not a readable NIfTI image (ImageFileError: File ct.nii.gz is not a gzip"),
    ("ct.nii", b"x" * 400, "not a readable NIfTI"),
])
def test_bad_headers_are_refused_naming_file_and_problem(tmp_path, name, data, problem):
    path = _write(tmp_path, name, data)
    with pytest.raises(CaseError) as err:
        check_nifti_header(path, LIMITS, case="pt_1")
    assert problem in str(err.value) and err.value.file == str(path) and err.value.case == "pt_1"


def test_size_limit_counts_the_float32_working_copy_and_is_configurable(tmp_path):
    path = _write(tmp_path, "ct.nii.gz", nifti_bytes(np.zeros((64, 64, 64), np.uint8)))
    assert check_nifti_header(path, LIMITS).loaded_bytes == 64**3 * 4  # uint8 on disk, float32 in memory
    check_nifti_header(path, ImageLimits(max_image_mb=1.0))
    with pytest.raises(CaseError, match=r"1 MiB in memory, the limit is 0.5 MiB"):
        check_nifti_header(path, ImageLimits(max_image_mb=0.5))
    assert ImageLimits.from_setting("0.5").max_image_mb == 0.5 and ImageLimits.from_setting("") == LIMITS
    for bad in ("lots", "-1", "0", "nan"):
        with pytest.raises(ValueError, match="max_image_mb"):
            ImageLimits.from_setting(bad)


def test_a_single_volume_4d_file_is_a_volume(tmp_path):
    path = _write(tmp_path, "ct.nii.gz", nifti_bytes(np.zeros((4, 5, 6, 1), np.int16)))
    assert check_nifti_header(path, LIMITS).shape == (4, 5, 6, 1)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data_are_found_without_loading(tmp_path, gz):
    whole = nifti_bytes(np.arange(32**3, dtype=np.float32).reshape(32, 32, 32), gz=gz)
    ok = _write(tmp_path, "ok.nii.gz" if gz else "ok.nii", whole)
    check_nifti_complete(ok, check_nifti_header(ok, LIMITS))
    cut = _write(tmp_path, "cut.nii.gz" if gz else "cut.nii", truncated(whole, 0.6))
    with pytest.raises(CaseError, match="truncated") as err:
        check_nifti_complete(cut, check_nifti_header(cut, LIMITS), case="pt_1")
    assert err.value.file == str(cut)


def test_case_loading_refuses_a_header_bomb_before_allocating(tmp_path, synthetic_case_dir, monkeypatch):
    """A 1.4 kB ct.nii claiming 2000^3 int16 (16 GB) is refused by the loader with a CaseError;
    the process's peak memory does not move."""
    (synthetic_case_dir / "ct.nii.gz").unlink()
    _write(synthetic_case_dir, "ct.nii", nifti_header_only((2000, 2000, 2000), "int16"))
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CaseError, match="ct.nii: image of shape") as err:
        load_case_folder(synthetic_case_dir)
    assert err.value.case == synthetic_case_dir.name
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kb < 200 * 1024
    # the CLI's limit comes from the environment
    monkeypatch.setenv(MAX_IMAGE_MB_ENV, "0.001")
    (synthetic_case_dir / "ct.nii").unlink()
    with pytest.raises(CaseError, match="the limit is 0.001 MiB"):
        load_case_folder(synthetic_case_dir)


def test_loading_within_limits_is_unchanged(synthetic_case_dir):
    explicit = load_case_folder(synthetic_case_dir, limits=ImageLimits(max_image_mb=64))
    default = load_case_folder(synthetic_case_dir)
    assert np.array_equal(explicit.ct_hu, default.ct_hu)
    with pytest.raises(CaseError, match="the limit is 0.01 MiB"):
        load_case_folder(synthetic_case_dir, limits=ImageLimits(max_image_mb=0.01))
