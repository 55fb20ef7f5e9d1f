"""``prepare``: the songs / phrases / bars datasets of a raw corpus, with a summary.

  python -m phraseldm_jax.cli.prepare --source pop909 --input ../shared/data/pop909 \\
      --data_dir data_cache/pop909
  python -m phraseldm_jax.cli.prepare --source midi --input <folder> --data_dir <dir> \\
      [--programs 0,25,13] [--drums] [--name_regex 'piano|melody'] [--max_tracks 3] \\
      [--program_map 1:0,2:0] [--slot_programs 13,25,0] [--no_key_norm]
  python -m phraseldm_jax.cli.prepare --source synthetic --data_dir <dir> [--n_songs 48]
  python -m phraseldm_jax.cli.prepare --verify --data_dir <dir>

A rebuild (``--overwrite``) is written beside the old datasets, in
``<data_dir>/incomplete.<pid>.<random>/``, and swapped in as one set when finished: a build
that fails or is killed leaves the old set whole, and the next run removes its leftovers.
``--verify`` reads back every record and names each damaged file and record (exit status 1).

The summary is printed and saved to ``<data_dir>/prepare_summary.json``; the work is
``input_pipeline.prepare.build``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from phraseldm_jax.cli import common

PROG = "python -m phraseldm_jax.cli.prepare"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from input_pipeline import tfds_builders

    parser.add_argument(
        "--source", choices=tfds_builders.SOURCES, help="kind of corpus (required to build)"
    )
    parser.add_argument("--input", help="raw corpus folder (pop909, midi)")
    parser.add_argument("--data_dir", required=True, help="where the datasets are written")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes importing songs",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild existing datasets")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="build nothing: read back every record under --data_dir and name the damaged "
        "ones (exit status 1 when any)",
    )
    parser.add_argument("--limit", type=int, help="pop909: only the first N songs")
    parser.add_argument("--n_songs", type=int, default=48, help="synthetic: corpus size")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: corpus seed")
    group = parser.add_argument_group("midi track selection")
    group.add_argument("--programs", help="keep pitched tracks with these programs, e.g. 0,25")
    group.add_argument("--drums", action="store_true", help="keep drum tracks")
    group.add_argument("--name_regex", help="keep tracks whose name matches")
    group.add_argument("--max_tracks", type=int, help="keep the N tracks with most notes")
    group.add_argument("--program_map", help="remap programs, e.g. 1:0,2:0")
    group.add_argument("--slot_programs", help="programs by pitch rank, e.g. 13,25,0")
    group.add_argument("--no_key_norm", action="store_true", help="skip key normalisation")


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any file is scanned (``UsageError`` saying which and why)."""
    from input_pipeline import midi_folder

    if args.source is None:
        raise common.UsageError("--source is required (or --verify to check --data_dir)")
    for flag, value in (("--workers", args.workers), ("--limit", args.limit),
                        ("--n_songs", args.n_songs), ("--max_tracks", args.max_tracks)):  # fmt: skip
        if value is not None and value < 1:
            raise common.UsageError(f"{flag} must be >= 1, got {value}")
    parsers = (
        ("--programs", midi_folder.parse_programs),
        ("--slot_programs", midi_folder.parse_programs),
        ("--program_map", midi_folder.parse_program_map),
        ("--name_regex", midi_folder.check_name_pattern),
    )
    for flag, parse in parsers:
        value = getattr(args, flag[2:])
        try:
            parse(value)
        except ValueError as error:
            raise common.UsageError(f"{flag} {value}: {error}") from None
    if args.source != "synthetic":
        if not args.input:
            raise common.UsageError(f"--input is required for --source {args.source}")
        if not os.path.isdir(args.input):
            raise common.UsageError(f"--input {args.input}: no such folder")


def verify(args: argparse.Namespace) -> int:
    """``--verify``: one line per damaged file or record, then a summary line; 1 when any."""
    from input_pipeline import verify as verify_lib

    if args.source is not None:
        raise common.UsageError("--verify checks --data_dir and builds nothing; drop --source")
    if not os.path.isdir(args.data_dir):
        raise common.UsageError(f"--data_dir {args.data_dir}: no such folder")
    try:
        report = verify_lib.verify(args.data_dir, progress=True)
    except FileNotFoundError as error:
        raise common.UsageError(str(error)) from None
    for line in report.problems:
        print(line)
    print(report.summary_line())
    if report.problems:
        print(f"rebuild with {PROG} --source ... --data_dir {args.data_dir} --overwrite")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    from input_pipeline import prepare

    if args.verify:
        return verify(args)
    check_args(args)
    command = " ".join([PROG, *getattr(args, "argv", sys.argv[1:])])
    try:
        summary = prepare.build(args, command)
    except prepare.NothingImported as error:
        prepare.print_summary(error.summary)
        raise common.UsageError(str(error)) from None
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise common.UsageError(str(error)) from None
    prepare.print_summary(summary)
    print(f"written: {summary['written']}")
    print(
        f"wall time {summary['wall_seconds']} s; summary in {args.data_dir}/{prepare.SUMMARY_FILE}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def run_with_argv(args: argparse.Namespace) -> int:
        args.argv = argv  # recorded in the summary as the command that built the datasets
        return run(args)

    return common.run_command(PROG, add_arguments, run_with_argv, argv, DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
