"""Options and range checks shared by the CLI sub-commands.

argparse checks types but not ranges, so `--steps 0` used to reach the sampler and end in a
traceback. These checks raise `ConfigError`, which `diffkt3d.cli.main` prints as one line (exit 2)
before any model is loaded.
"""

from __future__ import annotations

import argparse

from diffkt3d.errors import ConfigError


def require_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Raise ConfigError naming the first option below its minimum.

    Args:
        args: the parsed arguments.
        minimums: argparse dest name (e.g. "steps") -> smallest accepted value.
    """
    for dest, low in minimums.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise ConfigError(f"--{dest.replace('_', '-')} must be an integer >= {low}, found {value}")


def add_latent_model_args(p: argparse.ArgumentParser) -> None:
    """``--vae-dir`` / ``--latent-cache-dir``: what a latent-space ``--model`` needs (predict, impute)."""
    p.add_argument("--vae-dir", default=None, metavar="DIR",
                   help="Wan VAE folder (diffusers AutoencoderKLWan) a latent-space --model was trained with; "
                        "checked by fingerprint, unused by voxel-space models")
    p.add_argument("--latent-cache-dir", default=None, metavar="DIR",
                   help="also keep the VAE-encoded conditions of a latent-space model on disk (reused by later runs)")
