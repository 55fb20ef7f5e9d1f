"""benchmarks/sampler_quality.py: run specs, the evaluator call, merging results, the table."""

import json

import pytest

from benchmarks import sampler_quality
from phraseldm_jax import ldm_task, vae_inference


def test_parse_run():
    assert sampler_quality.parse_run("ddpm:1000") == {"sampler": "ddpm", "num_steps": 1000}
    assert sampler_quality.parse_run(" dpmpp_2m:25:clipped_eps=1:spacing=leading:seed=3 ") == {
        "sampler": "dpmpp_2m",
        "num_steps": 25,
        "clipped_eps": True,
        "timestep_spacing": "leading",
        "seed": 3,
    }
    assert sampler_quality.parse_run("ddim:50:eta=0.5:clip=none")["eta"] == 0.5
    assert sampler_quality.parse_run("dpmpp_2m:10:dtype=bfloat16")["compute_dtype"] == "bfloat16"
    run = sampler_quality.parse_run("dpmpp_2m:10:decode_dtype=bfloat16")
    assert run["decode_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("euler:10", "sampler:steps"),
        ("ddim", "sampler:steps"),
        ("ddim:ten", "not an integer"),
        ("ddim:10:foo=1", "bad override"),
        ("ddim:10:seed", "bad override"),
        ("ddim:10:dtype=float16", "dtype must be"),
        ("ddim:10:decode_dtype=int8", "decode_dtype must be"),
    ],
)
def test_parse_run_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        sampler_quality.parse_run(spec)


def _fake_workdir(tmp_path):
    workdir = tmp_path / "ldm"
    workdir.mkdir()
    (workdir / "config.json").write_text(
        json.dumps({"vae": {"workdir": "/vae", "checkpoint": "best"}})
    )
    return str(workdir)


def test_runs_call_the_evaluator_and_merge_into_out(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeDecoder:
        def __init__(self, path):
            self.path, self.compute_dtype = path, "unset"

    def fake_evaluate(workdir, which, decoder, **overrides):
        calls.append((workdir, which, decoder.path, overrides, decoder.compute_dtype))
        return {
            "workdir": workdir,
            "eval": {"seed": overrides["seed"]},
            "phrase_fid": 10.0 + len(calls),
        }

    monkeypatch.setattr(ldm_task, "evaluate_checkpoint", fake_evaluate)
    monkeypatch.setattr(
        vae_inference.PhraseVAEModel,
        "from_workdir",
        lambda path, which: FakeDecoder(f"decoder:{path}"),
    )
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"runs": {"ddpm:1000": {"phrase_fid": 99.0, "eval": {"seed": 0}}}}))
    workdir = _fake_workdir(tmp_path)
    argv = ["--workdir", workdir, "--num_songs", "3", "--out", str(out)]
    runs = "ddim:10,dpmpp_2m:5:clipped_eps=1:seed=4:decode_dtype=bfloat16"
    assert sampler_quality.main(argv + ["--runs", runs]) == 0

    assert [c[3] for c in calls] == [
        {
            "seed": 0,
            "num_songs": 3,
            "target_bars": 64,
            "loss_batches": 0,
            "sampler": "ddim",
            "num_steps": 10,
        },
        {
            "seed": 4,
            "num_songs": 3,
            "target_bars": 64,
            "loss_batches": 0,
            "sampler": "dpmpp_2m",
            "num_steps": 5,
            "clipped_eps": True,
        },
    ]
    assert all(c[0] == workdir and c[1] == "latest" and c[2] == "decoder:/vae" for c in calls)
    assert [c[4] for c in calls] == [None, "bfloat16"]  # the decoder's dtype for each run
    runs = json.loads(out.read_text())["runs"]
    name = "dpmpp_2m:5:clipped_eps=1:seed=4:decode_dtype=bfloat16"
    assert list(runs) == ["ddpm:1000", "ddim:10", name]
    assert runs["ddim:10"]["decode_dtype"] == "float32" and runs[name]["decode_dtype"] == "bfloat16"
    assert runs["ddpm:1000"]["phrase_fid"] == 99.0  # earlier runs are kept
    assert runs["ddim:10"]["phrase_fid"] == 11.0 and "wall_seconds" in runs["ddim:10"]

    capsys.readouterr()
    assert sampler_quality.main(["--out", str(out), "--table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | seed | PhraseFID |")
    assert len(table) == 5 and table[2].startswith("| ddpm:1000 | 0 | 99.0 |")
    assert table[4].startswith(f"| {name} | 4 | 12.0 |")


def test_bad_arguments_and_bad_results_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        sampler_quality.main(["--out", str(tmp_path / "r.json")])
    assert err.value.code == 2 and "--workdir and --runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sampler_quality.main(
            ["--workdir", "w", "--runs", "ddim:x", "--out", str(tmp_path / "r.json")]
        )
    assert "not an integer" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        sampler_quality.main(["--out", str(bad), "--table"])
