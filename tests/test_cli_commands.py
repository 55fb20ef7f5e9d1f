"""The commands of ``phraseldm_jax.cli`` share one style: every flag has a help text and
``--help`` shows the defaults; ``cli.evaluate`` hands its flags to ``evaluate_checkpoint``."""

import json

import pytest

from phraseldm_jax import ldm_task
from phraseldm_jax.cli import common, evaluate, latent_tools, latents, vae

COMMANDS = {"vae": vae, "latent_tools": latent_tools, "latents": latents, "evaluate": evaluate}


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
    argv = ["--workdir", "w", "--sampler", "ddim", "--steps", "5", "--guidance", "2", "--out"]
    assert evaluate.main([*argv, str(out)]) == 0
    ((workdir, which, overrides),) = calls
    assert (workdir, which) == ("w", "best")
    assert overrides["sampler"] == "ddim" and overrides["num_steps"] == 5
    assert overrides["guidance_scale"] == 2.0 and "num_songs" not in overrides
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
