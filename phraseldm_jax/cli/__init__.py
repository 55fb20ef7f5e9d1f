"""The project's commands other than training and sampling, in one place and one style.

Run as ``python -m phraseldm_jax <command> [--help]`` (or ``python -m phraseldm_jax.cli.<command>``).
Each command is a module here with ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; ``common.py`` holds what they share (the parser style with defaults in
``--help``, one-line usage errors with exit status 2). Library modules carry no command line
of their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# Command name -> module of this package, in the order of the data-to-songs workflow.
COMMANDS = {
    "prepare": "prepare",
    "latents": "latents",
    "vae": "vae",
    "latent_tools": "latent_tools",
    "evaluate": "evaluate",
    "convert": "convert",
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phraseldm_jax <command> ...``: one parser with every command as a
    subcommand (each keeps its own ``--help``)."""
    from phraseldm_jax.cli import common  # here: the package is imported by its own modules

    parser = common.make_parser("python -m phraseldm_jax", __doc__.split("\n\n")[0])
    commands = common.add_subcommands(parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"phraseldm_jax.cli.{module_name}")
        sub = common.subcommand(commands, name, module.DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return common.run_parsed(f"{parser.prog} {args.command}", args._run, args)
