"""``python -m phraseldm_jax <command> ...``: every command of this package as a subcommand
of one parser (each keeps its own ``--help``)."""

from __future__ import annotations

from collections.abc import Sequence

from phraseldm_jax.cli import common, convert, evaluate, latent_tools, latents, prepare, ship, vae

# In the order of the workflow: data, latents, the VAE on files, scoring, conversion, shipping.
COMMANDS = {
    "prepare": prepare,
    "latents": latents,
    "vae": vae,
    "latent_tools": latent_tools,
    "evaluate": evaluate,
    "convert": convert,
    "ship": ship,
}
PROG = "python -m phraseldm_jax"


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.make_parser(
        PROG, "The phraseldm-jax commands other than training and sampling."
    )
    subcommands = common.add_subcommands(parser)
    for name, module in COMMANDS.items():
        sub = common.subcommand(subcommands, name, module.DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _name=name)  # args.command: a subcommand's own
    args = parser.parse_args(argv)
    return common.run_parsed(f"{PROG} {args._name}", args._run, args)
