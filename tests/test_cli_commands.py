"""The commands of ``phraseldm_jax.cli`` share one style: every flag has a help text and
``--help`` shows the defaults; ``python -m phraseldm_jax`` reaches every one of them;
``cli.evaluate`` hands its flags to ``evaluate_checkpoint``."""

import json
import subprocess
import sys

import pytest

from phraseldm_jax import ldm_task
from phraseldm_jax.cli import commands as entry_point
from phraseldm_jax.cli import common, convert, evaluate, latent_tools, latents, prepare, ship, vae

COMMANDS = {
    "vae": vae,
    "latent_tools": latent_tools,
    "latents": latents,
    "evaluate": evaluate,
    "prepare": prepare,
    "convert": convert,
    "ship": ship,
}


def _parsers(module):
    parser = common.make_parser(module.PROG, module.DESCRIPTION)
    module.add_arguments(parser)
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subparsers:
        return [parser]
    return list(subparsers[0].choices.values())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_has_help_and_help_shows_defaults(name, capsys):
    for parser in _parsers(COMMANDS[name]):
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert flags and all(a.help for a in flags), parser.prog
        assert all(s.startswith("--") and s == s.lower() for a in flags for s in a.option_strings)
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--help"])
        assert exit_info.value.code == 0
        assert "(default:" in capsys.readouterr().out
    if name == "evaluate":  # flags it leaves out keep the workdir config's values
        assert "(default: None)" not in parser.format_help()


def test_evaluate_passes_its_flags_to_evaluate_checkpoint(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(workdir, which, **overrides):
        calls.append((workdir, which, overrides))
        return {"workdir": workdir, "phrase_fid": 1.5}

    monkeypatch.setattr(ldm_task, "evaluate_checkpoint", fake)
    out = tmp_path / "m.json"
    w = tmp_path / "w"  # an LDM workdir as far as the checks before loading go
    w.mkdir()
    (w / "config.json").write_text(json.dumps({"model": {"dit": {}}}))
    argv = ["--workdir", str(w), "--sampler", "ddim", "--steps", "5", "--guidance", "2", "--out"]
    assert evaluate.main([*argv, str(out)]) == 0
    ((workdir, which, overrides),) = calls
    assert (workdir, which) == (str(w), "best")
    assert overrides["sampler"] == "ddim" and overrides["num_steps"] == 5
    assert overrides["guidance_scale"] == 2.0 and "num_songs" not in overrides
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    # Through the one entry point too (its dispatcher adds a handler to the namespace).
    assert entry_point.main(["evaluate", *argv, str(out)]) == 0
    assert calls[1][2] == overrides and not any(callable(v) for v in calls[1][2].values())


def test_one_entry_point_reaches_every_command(capsys):
    assert set(entry_point.COMMANDS) == set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        entry_point.main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in COMMANDS)
    with pytest.raises(SystemExit):
        entry_point.main(["vae", "decode", "--help"])
    assert "--workdir" in capsys.readouterr().out


def test_usage_errors_through_the_entry_point_are_one_line(tmp_path):
    """A mistake reported by a command's ``run`` (here: an existing dataset without
    ``--overwrite``) is one line naming the command, exit status 2."""
    argv = ["prepare", "--source", "synthetic", "--data_dir", str(tmp_path), "--n_songs", "4"]
    assert entry_point.main(argv) == 0
    result = subprocess.run(
        [sys.executable, "-m", "phraseldm_jax", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m phraseldm_jax prepare: error:")
