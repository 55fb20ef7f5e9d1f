"""``python -m phraseldm_jax <command>``: the commands of ``phraseldm_jax/cli``."""

import sys

from phraseldm_jax.cli.commands import main

sys.exit(main())
