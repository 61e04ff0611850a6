"""Range checks of numeric CLI options, shared by the sub-commands.

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
