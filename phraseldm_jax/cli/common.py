"""What every command shares: one argparse style, usage errors as one line with exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from phraseldm_jax.errors import CheckpointDamagedError


class UsageError(Exception):
    """A mistake of the user's (a flag, a file); printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's line breaks and shows every default (not for
    required flags and flags without a default, where "(default: None)" would mislead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def path(text: str) -> str:
    """argparse ``type`` of every path flag: ``~`` expanded; a relative path stays relative
    to the working folder, as the user wrote it (the checkpoint layer makes its paths
    absolute, ``fileio.user_path``, where Orbax needs it)."""
    return os.path.expanduser(text)


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser in the commands' style (``--snake_case`` flags, defaults shown)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )


def add_subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Subcommands with their own ``--help`` in the same style."""
    return parser.add_subparsers(
        dest="command", required=True, parser_class=argparse.ArgumentParser
    )


def subcommand(commands: argparse._SubParsersAction, name: str, description: str):
    """One subcommand parser: ``description``'s first sentence is its summary in the parent's
    help."""
    return commands.add_parser(
        name,
        help=summary(description, name),
        description=description,
        formatter_class=HelpFormatter,
    )


def summary(description: str, name: str = "") -> str:
    """The first sentence of a command's description, without a leading "``name``: "."""
    paragraph = " ".join(description.strip().split("\n\n")[0].split())
    paragraph = paragraph.removeprefix(f"``{name}``: ") if name else paragraph
    return paragraph.split(". ")[0].rstrip(".")


def run_command(
    prog: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> int:
    """Parse ``argv`` and run; a ``UsageError`` becomes ``prog: error: ...`` and exit 2."""
    parser = make_parser(prog, description)
    add_arguments(parser)
    return run_parsed(parser.prog, run, parser.parse_args(argv))


def run_parsed(
    prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """``run(args)``; a ``UsageError`` (or every checkpoint step damaged) becomes
    ``prog: error: ...`` and exit status 2."""
    try:
        return int(run(args) or 0)
    except (UsageError, CheckpointDamagedError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
