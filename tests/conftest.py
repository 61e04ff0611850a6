"""Shared fixtures: a small synthetic case (analytic geometry) and a tiny model checkpoint.

Real OpenKBP data live beside the repo in ../shared/datasets; tests that need them use
`openkbp_root` and are skipped with a clear reason when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffkt3d.data.case import Case
from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.data.synthetic import make_synthetic_case
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import save_checkpoint
from diffkt3d.models.config import get_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The product finds OpenKBP through $DIFFKT3D_DATA_ROOT (README); tests and the commands they run
# (benchmarks, recipes) use the copy beside the repository unless the caller set one.
os.environ.setdefault("DIFFKT3D_DATA_ROOT", str(SHARED / "datasets"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the real data must be there: a test that silently skips guards nothing."""
    if os.environ.get("CI") and not (SHARED / "datasets" / "openkbp").is_dir():
        pytest.exit(f"CI run without the OpenKBP data at {SHARED / 'datasets' / 'openkbp'}", returncode=3)


@pytest.fixture(scope="session")
def openkbp_root() -> Path:
    root = SHARED / "datasets" / "openkbp"
    if not root.is_dir():
        pytest.skip(f"OpenKBP data not found at {root}")
    return root


@pytest.fixture
def synthetic_case() -> Case:
    return make_synthetic_case()


@pytest.fixture
def synthetic_case_dir(tmp_path: Path) -> Path:
    return save_case_folder(make_synthetic_case(), tmp_path / "synthetic")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised `tiny` DiT on a 16^3 working grid (all 7 modalities)."""
    torch.manual_seed(0)
    enc = EncodingConfig(grid=(16, 16, 16))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities))
    model = Any2AnyDiT(cfg)
    # Non-zero head so outputs depend on inputs (the real init zeroes it).
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return save_checkpoint(path, model, cfg, enc, flow_shift=3.0, meta={"name": "tiny-test"})


@pytest.fixture(scope="session")
def tiny_prdit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random `tiny` PRDiT CT-imputation checkpoint on a 16^3 grid (tests/monailabel_app/tiny_model.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", REPO / "tests" / "monailabel_app" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_prdit_checkpoint(tmp_path_factory.mktemp("prdit") / "tiny-prdit.pt")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusers `AutoencoderKLWan` folder (tests/monailabel_app/tiny_latent.py)."""
    pytest.importorskip("diffusers")
    from tiny_latent import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("wan-vae"))


@pytest.fixture(scope="session")
def tiny_latent_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_vae_dir: Path) -> Path:
    """A latent-space `tiny` checkpoint for `tiny_vae_dir`: working grid 32 x 24 x 20 (the synthetic
    case's), crop 9 x 16 x 16 (clip order) -> latents 3 x 2 x 2."""
    from tiny_latent import write_tiny_latent_checkpoint

    return write_tiny_latent_checkpoint(tmp_path_factory.mktemp("latent") / "latent.pt", tiny_vae_dir,
                                        grid=(32, 24, 20), crop=(9, 16, 16))
