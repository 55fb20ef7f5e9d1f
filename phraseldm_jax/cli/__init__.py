"""The project's commands other than training and sampling, in one place and one style.

Run as ``python -m phraseldm_jax <command> [--help]`` (``commands.py``), the ``phraseldm``
script, or ``python -m phraseldm_jax.cli.<command>``. Each command is a module here with
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``; ``common.py`` holds what
they share (the parser style with defaults in ``--help``, one-line usage errors with exit
status 2). Library modules carry no command line of their own.
"""
