"""The ``steer`` command. Each feature module registers its own subcommands.

A module listed in COMMAND_MODULES exposes ``register(subparsers)``, adding parsers whose
``func(args)`` does the work. Errors a user can fix (bad spec, unknown layer, malformed file,
an option given twice) are printed as one line, never as a traceback.
"""
from __future__ import annotations

import argparse
import sys

from steer.ui.commands import build, demo, detox, early_exit, evaluation, layers, vectors

COMMAND_MODULES = (vectors, build, detox, evaluation, demo, layers, early_exit)
REPEATABLE = (argparse._AppendAction, argparse._CountAction, argparse._HelpAction, argparse._VersionAction)


class UserError(Exception):
    """An error caused by the command's input; printed without a traceback."""


class _Once:
    """Mixed into an option's action: a second use is an error (argparse would keep the last silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string or self.dest} is given twice; give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class StrictParser(argparse.ArgumentParser):
    """Options may be given once, and usage errors are one line (then ``steer CMD --help``)."""

    _once_classes: dict[type, type] = {}

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and not isinstance(action, REPEATABLE):
            kind = type(action)
            if kind not in self._once_classes:
                self._once_classes[kind] = type(f"Once{kind.__name__}", (_Once, kind), {})
            action.__class__ = self._once_classes[kind]
        return action

    def error(self, message: str):
        raise UserError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(prog="steer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)  # subparsers are StrictParsers too
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UserError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, OSError, KeyError) as err:
        message = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        prefix = f"steer {args.command}: "
        print(f"{prefix}error: {message.removeprefix(prefix)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steer {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
