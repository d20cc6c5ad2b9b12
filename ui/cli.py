"""The ``steer`` command. Each feature module registers its own subcommands.

A module listed in COMMAND_MODULES exposes ``register(subparsers)``, adding parsers whose
``func(args)`` does the work. Errors a user can fix (bad spec, unknown layer, malformed file)
are printed as one line, never as a traceback.
"""
from __future__ import annotations

import argparse
import sys

from steer.ui.commands import build, demo, detox, early_exit, evaluation, layers, vectors

COMMAND_MODULES = (vectors, build, detox, evaluation, demo, layers, early_exit)


class UserError(Exception):
    """An error caused by the command's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"steer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steer {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
