"""What every command shares: one argparse style, usage errors as one line with exit 2,
quiet library logging unless ``--verbose``."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence

from input_pipeline.damage import DamagedRecordError
from phraseldm_jax.errors import CheckpointDamagedError

# Loggers whose INFO/WARNING lines are library chatter to a user: Orbax ("Item progress was
# found in the checkpoint, but could not be restored"), JAX's backend probing ("Unable to
# initialize backend tpu"), TFDS, Grain. --verbose lets them through again.
CHATTY_LOGGERS = ("absl", "orbax", "jax", "jaxlib", "tensorflow_datasets", "grain", "etils")


class UsageError(Exception):
    """A mistake of the user's (a flag, a file); printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line ``prog: error: ...`` (exit 2), without
    the usage block (``--help`` has it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def add_vae_flags(parser: argparse.ArgumentParser) -> None:
    """``--workdir`` and ``--checkpoint`` of the commands that load a trained PhraseVAE."""
    parser.add_argument(
        "--workdir",
        type=path,
        required=True,
        help="PhraseVAE (stage 3) training workdir or original folder",
    )
    parser.add_argument(
        # checkpointing.WHICH, spelled out: importing checkpointing loads Orbax and JAX
        "--checkpoint",
        default="best",
        choices=("latest", "best"),
        help="checkpoint to load",
    )


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser in the commands' style (``--snake_case`` flags, defaults shown, ``--verbose``)."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_verbose_flag(parser)
    return parser


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: show the libraries' log messages (quiet by default)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the log messages of absl, Orbax, JAX and TFDS (hidden by default)",
    )


def quiet_logging(verbose: bool = False) -> None:
    """Library chatter off (ERROR and worse only), or everything from INFO with ``verbose``.

    Call before the libraries log: the commands call it first thing, the absl scripts in
    ``main``. Sets the absl verbosity (Orbax logs through absl), the Python loggers of
    ``CHATTY_LOGGERS`` and TensorFlow's C++ log level (for the rare TF import).
    """
    level = logging.INFO if verbose else logging.ERROR
    if verbose:  # a handler for INFO lines (absl's app.run installs its own)
        logging.basicConfig(level=logging.INFO)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # The package's own warnings stay (absl's verbosity below also sets the root logger's).
    logging.getLogger("phraseldm_jax").setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    try:
        from absl import logging as absl_logging
    except ImportError:  # absl comes with jax / orbax; a bare environment has nothing to quiet
        return
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)


def add_subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Subcommands with their own ``--help`` in the same style."""
    return parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)


def subcommand(commands: argparse._SubParsersAction, name: str, description: str):
    """One subcommand parser: ``description``'s first sentence is its summary in the parent's
    help."""
    parser = commands.add_parser(
        name,
        help=summary(description, name),
        description=description,
        formatter_class=HelpFormatter,
    )
    add_verbose_flag(parser)
    return parser


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
    ``prog: error: ...`` and exit status 2, a damaged dataset record the same line, status 1."""
    quiet_logging(getattr(args, "verbose", False))
    try:
        return int(run(args) or 0)
    except (UsageError, CheckpointDamagedError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except DamagedRecordError as error:  # the data, not the command line: exit status 1
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1


def usage_error(prog: str, message: str) -> int:
    """Prints ``prog: error: message`` (one line) and returns exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def closest(name: str, candidates: Iterable[str]) -> str:
    """``", did you mean 'x'?"`` for the candidate closest to ``name``, else ``""``."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def flat_keys(config) -> list[str]:
    """Every dotted key of an ml_collections ConfigDict (or nested dicts)."""
    out = []
    for key, value in config.items():
        out.append(key)
        if hasattr(value, "items"):
            out.extend(f"{key}.{sub}" for sub in flat_keys(value))
    return out


def override_key_error(argv: Sequence[str], config) -> str | None:
    """The first ``--config.<key>`` of ``argv`` that ``config`` has no such key for, said in
    one line with the closest valid key; None when every override names a key."""
    keys = flat_keys(config)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in keys:
            parent = key.rpartition(".")[0]
            siblings = [k for k in keys if k.rpartition(".")[0] == parent]
            hint = closest(key, siblings) or closest(key, keys)
            return f"unknown config key {key!r}{hint}"
    return None


def require_file(path: str, flag: str, suffixes: Sequence[str] = ()) -> None:
    """A ``UsageError`` when ``path`` (given as ``flag``) is no file or has none of
    ``suffixes``."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder, expected a file")
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise UsageError(f"{flag} {path}: expected a {' or '.join(suffixes)} file")


def require_output(path: str, flag: str) -> None:
    """A ``UsageError`` when ``path`` cannot be written: its folder is missing, or it is a
    folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")


def require_vae_folder(path: str, flag: str = "--workdir") -> None:
    """A ``UsageError`` unless ``path`` is a PhraseVAE training workdir (config.json with a
    ``model.t5`` group, and checkpoints) or a PhraseVAE folder in the original's layout."""
    from phraseldm_jax import checkpointing
    from phraseldm_jax.convert import original_layout

    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such folder")
    if original_layout.is_original_folder(path):
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(
            f"{flag} {path} is not a PhraseVAE workdir or original folder (no config.json)"
        )
    try:
        checkpointing.read_workdir_config(path, "t5")
    except ValueError as error:
        raise UsageError(f"{flag} {path} is not a PhraseVAE workdir ({error})") from None
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise UsageError(f"{flag} {path}: no checkpoints/ folder (has it been trained?)")


def load_config_file(spec: str):
    """``configs/x.py[:arg]`` -> its ``get_config([arg])`` (how ml_collections loads it)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def flag_error(argv: Sequence[str], error: BaseException) -> str:
    """One line for an absl script's flag-parsing failure: an unknown ``--config.<key>`` says
    the key and the closest valid one; anything else its first line."""
    spec = _config_spec(argv)
    if spec is not None:
        try:
            message = override_key_error(argv, load_config_file(spec))
        except UsageError as usage:
            return str(usage)
        except Exception:  # the config file itself fails: say what absl said
            message = None
        if message:
            return message
    lines = [line for line in str(error).strip("'\"").splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def run_absl(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None):
    """``absl.app.run(main)``, but a flag or config-override mistake is one line
    ``prog: error: ...`` with exit status 2 instead of a traceback (or absl's exit 1), and a
    damaged dataset record read while running is that line with exit status 1."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    started = []

    def run_main(args):
        started.append(True)
        return main(args)

    try:
        app.run(run_main, argv=argv)
    except SystemExit as exit_:
        if not started and exit_.code not in (0, None):
            raise SystemExit(2) from None  # absl has printed the flag error
        raise
    except DamagedRecordError as error:  # a dataset record read during training
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:
        if started:
            raise
        raise SystemExit(usage_error(prog, flag_error(argv[1:], error))) from None
