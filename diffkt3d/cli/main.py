"""`diffkt3d` command line: one sub-command per module in this package.

Each sub-command module exposes `register(subparsers)` which adds its parser and sets
`func(args) -> int`. User errors (DiffKT3DError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from diffkt3d.errors import DiffKT3DError

# module name in diffkt3d.cli -> sub-command(s) it registers
_COMMAND_MODULES: tuple[str, ...] = (
    "predict",
    "impute",
    "evaluate",
    "train",
    "import_cmd",
    "export_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkt3d", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"diffkt3d.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DiffKT3DError as exc:
        print(f"diffkt3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffkt3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
