"""Fixtures for the Slicer module's Lib: import path, a real MRML scene (slicer-core), a case.

The Lib lives in slicer_extension/DiffKT3D/DiffKT3DLib and is imported as Slicer imports it
(the module folder on sys.path). Scene tests use the `slicer-core` wheel: headless MRML with the
same node classes and segmentation logic as Slicer, no Qt and no application.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "slicer_extension" / "DiffKT3D"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

OPENKBP_VALIDATION = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation")
# Structures used by scene tests (a subset keeps them fast; PTV70 gives the prescription).
CASE_STRUCTURES = ("PTV70", "PTV56", "Brainstem", "SpinalCord", "LeftParotid", "possible_dose_mask")

_converters_registered = False


@pytest.fixture(scope="session")
def slicer_core():
    """The `slicer` package from slicer-core, with the segmentation converters Slicer registers."""
    global _converters_registered
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    if not _converters_registered:
        # Slicer's Segmentations module does this at start-up; a bare slicer-core does not.
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())
        _converters_registered = True
    return slicer


@pytest.fixture
def scene(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="session")
def case_dir() -> Path:
    folder = OPENKBP_VALIDATION / "pt_201"
    if not (folder / "ct.nii.gz").exists():
        pytest.skip(f"OpenKBP validation case not found at {folder}")
    return folder


@pytest.fixture
def loaded_case(slicer_core, scene, case_dir):
    from DiffKT3DLib.selftest import load_case_folder

    return load_case_folder(scene, case_dir, CASE_STRUCTURES)


def _nifti_kji(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array in Slicer's (K, J, I) order, affine) of a NIfTI read with nibabel (independent reader)."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0), img.affine


@pytest.fixture(scope="session")
def nifti_kji():
    """Reader of a NIfTI in Slicer's (K, J, I) array order, with nibabel (independent of MRML)."""
    return _nifti_kji


@pytest.fixture(scope="session")
def case_structures() -> tuple[str, ...]:
    return CASE_STRUCTURES


@pytest.fixture
def set_segment(slicer_core):
    """Replace a segment's voxels the way Segment Editor effects do (SetBinaryLabelmapToSegment)."""
    from DiffKT3DLib.selftest import set_segment_voxels

    return set_segment_voxels


# -- a real DiffKT3D server ------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def diffkt3d_server(tmp_path_factory, case_dir, tiny_checkpoint):
    """`monailabel start_server --app monailabel_app` on a free port, as a subprocess.

    Studies: a temporary copy of one OpenKBP validation case. Model: the shared randomly initialised
    `tiny` checkpoint (fixture `tiny_checkpoint` in tests/conftest.py), so no weights are
    downloaded. Yields the base URL in host:port form (what users type).
    """
    import importlib.util
    import os
    import shutil
    import subprocess
    import time
    import urllib.request

    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed (see docs/server.md)")
    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    studies.mkdir()
    shutil.copytree(case_dir, studies / case_dir.name)
    checkpoint = tiny_checkpoint
    port = _free_port()
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_INFER_CONCURRENCY": "1",
           "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "OMP_NUM_THREADS": "1"}
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["nice", "-n", "15", sys.executable, "-m", "monailabel.main", "start_server",
             "--app", str(REPO / "monailabel_app"), "--studies", str(studies), "--port", str(port),
             "--host", "127.0.0.1", "--conf", "model", str(checkpoint), "--conf", "model_dir", str(root / "model")],
            cwd=str(root), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
