"""The fault-injection suite (benchmarks/fault_injection.py) at its smallest: two SIGKILLs of
the tiny PhraseVAE run, resumed to the end and compared with an uninterrupted run, plus the
harness's comparison and damage helpers on their own."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import fault_cases, fault_harness, fault_injection


@pytest.fixture(scope="module")
def two_kills(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    out = folder / "faults.json"
    # Seed 2 kills at steps 7 and 18 (of 24, checkpoints every 4): after the first checkpoint.
    # (A kill before it resumes from scratch, and main keeps the killed run's rows then:
    # duplicate rows, which the suite's full run reports until metric_writer drops them.)
    argv = ["--cases", "sigkill_vae", "--trials", "2", "--fast", "--seed", "2"]
    code = fault_injection.main([*argv, "--out", str(out), "--keep", str(folder / "runs")])
    return code, json.loads(out.read_text()), folder / "runs"


def test_two_sigkills_resume_to_the_reference_bit_for_bit(two_kills):
    code, result, _ = two_kills
    case = result["cases"]["sigkill_vae"]
    assert code == 0 and case["ok"], case["outcome"]
    assert case["trials"] == 2 and case["data_corrupt"] == 0
    every = 4  # --fast: checkpoint every 4 steps
    for trial in case["trial_details"]:
        assert trial["outcome"] == "ok"
        assert 0 <= trial["steps_lost"] <= 2 * every
        assert trial["resumed_from"] % every == 0 and trial["resumed_from"] <= trial["reached"]
    assert result["references"]["vae"]["seconds"] > 0
    assert "| sigkill_vae |" in fault_injection.table(result["cases"])


def test_each_kill_left_a_resumable_workdir(two_kills):
    _, _, runs = two_kills
    killed = [p for p in runs.iterdir() if p.name.startswith("sigkill_vae-")]
    assert len(killed) == 1  # both kills hit the same run
    rows, bad = fault_harness.metric_rows(str(killed[0]))
    assert bad == 0 and [r["step"] for r in rows] == list(range(1, 25))
    logs = sorted((runs / "logs").glob("*_kill_vae.err"))
    assert len(logs) == 2 and all("Traceback" not in p.read_text() for p in logs)


def test_comparison_finds_duplicates_and_differences(tmp_path):
    rows = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    assert fault_harness.duplicate_steps(rows + [{"step": 2, "train/loss": 1.5}]) == [2]
    assert fault_harness.duplicate_steps(rows + [{"step": 2, "eval/loss": 1.0}]) == []
    assert fault_harness.comparable({"step": 1, "eval/seconds": 3.0}) == {"step": 1}
    a = {"w": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    b = {
        "w": np.zeros(3, np.float32),
        "b": np.array([1, np.nextafter(np.float32(1), np.float32(2))], np.float32),
    }
    assert fault_harness.tree_differences(a, a) == []
    assert fault_harness.tree_differences(a, b) == ["['b']"]
    assert fault_harness.nonfinite_leaves({"w": np.array([np.nan], np.float32)}) == ["['w']"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr')
    assert fault_harness.metric_rows(str(tmp_path)) == ([{"step": 1}], 1)
    assert fault_harness.last_logged_step(str(tmp_path)) == 1


def test_damage_changes_exactly_what_it_says(tmp_path):
    blob = tmp_path / "state" / "d" / "blob"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "state" / "_METADATA").write_text("{}")
    suite = fault_cases.Suite(str(tmp_path / "suite"), np.random.default_rng(0))
    flipped = fault_cases.flip_bit(suite, str(tmp_path))
    data = np.frombuffer(blob.read_bytes(), np.uint8)
    original = np.frombuffer(bytes(range(256)) * 4, np.uint8)
    changed = np.flatnonzero(data != original)
    assert flipped["file"] == os.path.join("state", "d", "blob")
    assert changed.tolist() == [flipped["offset"]]
    assert data[changed[0]] ^ original[changed[0]] == 1 << flipped["bit"]
    cut = fault_cases.truncate_file(suite, str(tmp_path))
    assert os.path.getsize(tmp_path / cut["file"]) == cut["kept"] < cut["size"]
