"""The server's model provider with a latent-space checkpoint: `--conf vae_dir` names its VAE."""

from __future__ import annotations

import pytest

pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
pytest.importorskip("diffusers")

from diffkt3d.errors import ConfigError  # noqa: E402
from diffkt3d.inference.latent_predictor import LatentPredictor  # noqa: E402
from infer_tasks.common import TaskError, model_provider  # noqa: E402


def test_provider_serves_a_latent_checkpoint_with_its_vae(tmp_path, tiny_latent_checkpoint, tiny_vae_dir):
    provider = model_provider(tmp_path / "model", str(tiny_latent_checkpoint), "cpu", str(tiny_vae_dir))
    predictor = provider.get()
    assert isinstance(predictor, LatentPredictor) and provider.get() is predictor  # loaded once, cache kept
    assert provider.version() == predictor.model_version


def test_provider_without_or_with_a_wrong_vae_is_a_503_naming_the_setting(tmp_path, tiny_latent_checkpoint):
    provider = model_provider(tmp_path / "model", str(tiny_latent_checkpoint), "cpu")
    with pytest.raises(TaskError) as err:
        provider.get()
    assert err.value.status == 503 and "--conf vae_dir" in str(err.value)
    assert provider.version() is None  # /info/ keeps working
    with pytest.raises(ConfigError, match="vae_dir .* not a folder"):
        model_provider(tmp_path / "model", str(tiny_latent_checkpoint), "cpu", str(tmp_path / "missing"))
