"""benchmarks.plot_training: learning-curve PNGs from metrics.jsonl, bad runs in one line."""

import json

import pytest

from benchmarks import plot_training


def _workdir(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chained_runs_plot_to_a_png(tmp_path):
    first = _workdir(tmp_path / "a", [{"step": s, "eval/f1_op": 0.1 * s} for s in (1, 2)])
    second = _workdir(tmp_path / "b", [{"step": 1, "eval/f1_op": 0.5}, {"step": 2}])
    assert plot_training.curves(str(second), "eval/f1_op") == ([1], [0.5])
    out = tmp_path / "curves.png"
    argv = ["--run", f"A={first}", "--run", f"B={second}", "--metric", "eval/f1_op",
            "--metric", "train/loss", "--out", str(out), "--chain"]  # fmt: skip
    assert plot_training.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        plot_training.main(["--run", f"A={tmp_path}", "--metric", "m", "--out", "x.png"])
    assert exit_.value.code == 2
    assert (
        f"--run A={tmp_path}: expected LABEL=WORKDIR with a metrics.jsonl"
        in capsys.readouterr().err
    )
