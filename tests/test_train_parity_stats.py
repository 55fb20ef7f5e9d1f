"""The statistics of the statistical training parity (``benchmarks/train_parity_stats.py``):
the moving mean, our mean's distance from the reference's seed spread, the envelope share,
and the ``--statistical`` flags. The runs themselves are a benchmark (minutes), not a test."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import train_parity
from benchmarks import train_parity_stats as stats


def test_moving_mean_is_the_trailing_window_mean():
    curves = np.arange(12, dtype=float).reshape(2, 6) ** 2
    smoothed = stats.moving_mean(curves, 3)
    naive = np.array([[row[i : i + 3].mean() for i in range(4)] for row in curves])
    np.testing.assert_allclose(smoothed, naive)
    np.testing.assert_allclose(stats.moving_mean(curves, 1), curves)
    with pytest.raises(ValueError, match="window 7 must be in"):
        stats.moving_mean(curves, 7)


def test_spread_report_measures_distance_in_reference_stds_and_envelope_share():
    steps = 8
    reference = np.array([[1.0] * steps, [2.0] * steps, [3.0] * steps])  # mean 2, std 1
    inside = stats.spread_report(np.full((2, steps), 2.5), reference, window=1)
    assert inside["reference_std_mean"] == pytest.approx(1.0)
    assert inside["reference_envelope_width_mean"] == pytest.approx(2.0)
    assert inside["distance_max_std"] == pytest.approx(0.5)
    assert inside["inside_envelope_share"] == 1.0
    assert inside["seeds"] == {"ours": 2, "reference": 3}
    # Half the steps inside (2.5), half outside the [1, 3] envelope (4.0: 2 stds off).
    ours = np.array([[2.5] * 4 + [4.0] * 4])
    mixed = stats.spread_report(ours, reference, window=1)
    assert mixed["inside_envelope_share"] == 0.5
    assert mixed["distance_max_std"] == pytest.approx(2.0)
    assert mixed["distance_mean_std"] == pytest.approx(1.25)
    assert mixed["signed_mean_std"] == pytest.approx(1.25)
    assert mixed["final"] == {"ours_mean": 4.0, "reference_mean": 2.0, "reference_std": 1.0}
    # Smoothing over 4 steps: the points are the means of steps i..i+3.
    smoothed = stats.spread_report(ours, reference, window=4)
    assert smoothed["points"] == 5
    assert smoothed["distance_max_std"] == pytest.approx(2.0)
    assert smoothed["distance_mean_std"] == pytest.approx(np.mean([0.5, 0.875, 1.25, 1.625, 2]))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.spread_report(ours, reference[:1], window=1)


def test_equal_runs_expectations_match_simulated_equal_distributions():
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((400_000, 3)).mean(1)
    reference = rng.standard_normal((400_000, 4))
    distance = np.abs(ours - reference.mean(1))
    std = reference.std(1, ddof=1)
    expected = stats.equal_runs_expectations(3, 4)
    assert np.mean(distance / std) == pytest.approx(expected["distance_mean_std"], rel=0.02)
    assert np.mean(distance) / np.mean(std) == pytest.approx(
        expected["distance_mean_over_std_mean"], rel=0.01
    )
    inside = (ours >= reference.min(1)) & (ours <= reference.max(1))
    assert np.mean(inside) == pytest.approx(expected["inside_envelope_share"], abs=0.005)
    # One run against 3: inside their range with probability (n - 1) / (n + 1) = 1/2.
    assert stats.equal_runs_expectations(1, 3)["inside_envelope_share"] == pytest.approx(
        0.5, abs=0.005
    )
    assert stats.equal_runs_expectations(3, 2)["distance_mean_std"] == float("inf")


def test_statistical_flags_default_to_500_steps_and_two_cases():
    args, cases = train_parity.parse_args(["--statistical"])
    assert args.steps == 500 and args.seeds == 3 and args.window == 25
    assert cases == list(stats.STATISTICAL_CASES)
    args, cases = train_parity.parse_args([])
    assert args.steps == 50 and cases == list(train_parity.CASES)
    with pytest.raises(SystemExit) as exit_info:
        train_parity.parse_args(["--statistical", "--seeds", "1"])
    assert exit_info.value.code == 2


def test_replot_reanalyses_a_saved_run_and_names_an_unreadable_file(tmp_path, capsys):
    import json

    rng = np.random.default_rng(0)
    curves = (5 + rng.standard_normal((2, 3, 40)) * 0.1).tolist()
    case = {"ours": curves[0], "torch": curves[1], "size": "tiny", "batch_size": 2}
    saved, png = tmp_path / "stats.json", tmp_path / "stats.png"
    saved.write_text(json.dumps({"window": 5, "cases": {"vae_stage3": case}}))
    flags = ["--statistical", "--replot", "--out", str(saved), "--plot", str(png)]
    assert train_parity.main(flags) == 0
    assert png.stat().st_size > 10_000
    assert "| vae_stage3 | 3/3 |" in capsys.readouterr().out
    reanalysed = json.loads(saved.read_text())["cases"]["vae_stage3"]
    assert (
        reanalysed["ours_vs_torch"]["window"] == 5 and reanalysed["ours_vs_torch"]["points"] == 36
    )
    assert reanalysed["equal_runs"] == stats.equal_runs_expectations(3, 3)
    missing = tmp_path / "missing.json"
    assert train_parity.main(["--statistical", "--replot", "--out", str(missing)]) == 2
    assert f"cannot read the statistical results {missing}" in capsys.readouterr().err
