"""benchmarks/plan_eval.py: one generated song per real plan, SRS and bar counts."""

import ldm_fixtures
import numpy as np

from benchmarks import plan_eval
from phraseldm_jax import ldm, ldm_task


def test_one_song_per_fitting_plan_with_its_bar_count(tmp_path, capsys):
    codebook = ldm_fixtures.Codebook()
    lengths = [4, 8, 8, 40]  # the 40-bar song has no fitting plan: left out
    data_dir = ldm_fixtures.write_dataset(
        tmp_path / "latents", codebook, ldm_fixtures.fixed_length_songs(codebook, lengths),
        ldm_fixtures.fixed_length_songs(codebook, [8]),
    )  # fmt: skip
    config = ldm_fixtures.tiny_config(data_dir, sec_control=True)
    ldm_task.resolve_config(config)
    params = ldm.init_params(ldm_fixtures.init_key(), ldm_task.ldm_config(config))
    workdir = ldm_fixtures.save_workdir(tmp_path / "ldm", config, params)
    out = tmp_path / "plan_eval.json"
    _, args = plan_eval.parse_args(
        ["--workdir", workdir, "--latent_dir", data_dir, "--split", "train", "--steps", "4",
         "--out", str(out)]
    )  # fmt: skip
    result = plan_eval.evaluate(args, decoder=codebook)
    assert result["songs"] == 3 and result["plan_bars"] == [4, 8, 8]
    assert len(result["bars"]) == 3
    expected = np.mean(np.asarray(result["bars"]) == np.asarray([4, 8, 8]))
    assert result["plan_bars_match"] == expected
    assert result["srs_real"] >= 0 and np.isfinite(result["phrase_fid_forced"])

    assert plan_eval.main(["--workdir", str(tmp_path / "nope"), "--latent_dir", data_dir]) == 2
    assert "nope" in capsys.readouterr().err
