"""``python -m benchmarks.run --quick``: every case runs end to end at tiny sizes, side by side
with the torch reference, and writes JSON with positive numbers (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch", reason="the benchmarks compare against the torch extra")
pytest.importorskip("diffusers", reason="the benchmarks compare against the torch extra")

from benchmarks import common, run  # noqa: E402


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "quick.json"
    settings = common.cache_settings()
    try:
        code = run.main(
            ["--quick", "--out", str(out), "--cache_dir", str(folder / "cache"), "--threads", "1"]
        )
    finally:  # later tests in this process must not write to this run's cache
        common.restore_cache_settings(settings)
    assert code == 0
    return json.loads(out.read_text())


def test_every_case_and_the_machine_are_recorded(quick_result):
    assert set(quick_result["cases"]) == set(run.CASES)
    machine = quick_result["machine"]
    assert machine["cores"] >= 1 and machine["jax"] and machine["torch"]
    for case in quick_result["cases"].values():
        assert case["table"].startswith("|")
        assert positive(case["case_wall_s"])


def test_time_interleaved_takes_turns_and_times_every_call():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = common.time_interleaved(fns, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated rounds
    for name in "abc":
        timing, rss = timings[name]
        assert len(timing.times) == 3 and all(t >= 0 for t in timing.times) and rss >= 0


def test_dit_step_rows(quick_result):
    rows = quick_result["cases"]["dit_step"]["rows"]
    sides = {(r["side"], r["dtype"], r["batch"]) for r in rows}
    for batch in (1, 2):
        assert ("ours (jax)", "float32", batch) in sides
        assert ("ours (jax)", "bfloat16", batch) in sides
        assert ("torch", "float32", batch) in sides
    # batch 2 split over 2 of the 8 host devices, as the sampler would run it over a mesh
    assert {("ours (jax), 2 devices", d, 2) for d in ("float32", "bfloat16")} <= sides
    assert not any(side.endswith("devices") and batch == 1 for side, _, batch in sides)
    for r in rows:
        if "error" in r:  # torch bf16 autocast may be unsupported; then it says why
            assert r["side"] == "torch"
            continue
        assert positive(r["median_s"]) and positive(r["song_steps_per_s"])
        assert positive(r["speedup_vs_torch_f32"])
        if r["side"].startswith("ours (jax)"):
            assert positive(r["compile_s"]) and positive(r["peak_mib"])
            assert positive(r["flops_xla"])
            tolerance = 1e-3 if r["dtype"] == "float32" else 0.5  # same weights as torch
            assert r["max_abs_diff_vs_torch_f32"] < tolerance


def test_song_generation_rows(quick_result):
    case = quick_result["cases"]["song_generation"]
    ours = [r for r in case["rows"] if r["side"] == "ours (jax)"]
    reference = [r for r in case["rows"] if r["side"] != "ours (jax)"]
    assert {r["sampler"] for r in ours} == {"dpmpp_2m", "ddim"}
    assert {(r["sampler"], r["dit_dtype"]) for r in ours} == {
        (sampler, dtype) for sampler in ("dpmpp_2m", "ddim") for dtype in ("float32", "bfloat16")
    }
    assert len(reference) == 1 and reference[0]["steps"] == 1000
    assert reference[0]["extrapolated_from_steps"] >= 1
    for r in case["rows"]:
        for key in ("sample_s", "decode_s", "total_s"):
            assert positive(r[key]), (r, key)
    for r in ours:
        assert positive(r["speedup_vs_reference"]) and positive(r["compile_s"])


def test_vae_decoding_uniform_work(quick_result):
    case = quick_result["cases"]["vae_decoding"]
    rows = [r for r in case["rows"] if r["workload"] == "uniform"]
    devices = quick_result["machine"]["jax_devices"]
    assert devices == 8  # conftest's host devices: the split rows run too
    sides = ["ours (jax)", "ours (jax), bfloat16 matmuls"]
    sides += [f"{side}, {devices} devices" for side in sides] + ["torch generate"]
    assert [r["side"] for r in rows] == sides
    for r in rows:
        assert positive(r["phrases_per_s"]) and len(r["times_s"]) >= 1
        assert r["mean_positions"] == r["max_length"]  # [EOS] suppressed: every row runs all
    for r in rows[0], rows[2]:  # float32, one device and split: the greedy tokens of torch
        assert r["rows_equal_to_torch"] == 1.0 and r["compute_dtype"] == "float32"
    assert [r["devices"] for r in rows[:4]] == [1, 1, devices, devices]
    assert 0.0 <= rows[1]["rows_equal_to_ours_float32"] <= 1.0
    assert rows[1]["speedup_vs_torch"] == rows[-1]["median_s"] / rows[1]["median_s"]
    assert "skipped" in case["real_songs"]  # no --vae_workdir given


def test_train_step_rows(quick_result):
    rows = quick_result["cases"]["train_step"]["rows"]
    # quick batches: VAE 4, LDM 2 rows, data-parallel over as many of the 8 host devices;
    # float32, then bfloat16 compute
    sides = lambda n: [  # noqa: E731
        "ours (jax)", f"ours (jax), {n} devices", "ours (jax), bfloat16 compute",
        f"ours (jax), {n} devices, bfloat16 compute", "torch",
    ]  # fmt: skip
    assert [r["side"] for r in rows] == sides(4) + sides(2)
    for r in rows:
        assert positive(r["examples_per_s"]) and positive(r["loss"])
    for ours in (r for r in rows if r["side"] != "torch"):
        ref = next(r for r in rows if r["model"] == ours["model"] and r["side"] == "torch")
        assert positive(ours["peak_mib"]) and positive(ours["speedup_vs_torch"])
        assert ours["speedup_vs_torch"] == ref["median_s"] / ours["median_s"]
    for model in (rows[0:4], rows[5:9]):  # the same step: the same loss
        single = model[0]
        assert all(r["model"] == single["model"] for r in model)
        assert model[1]["loss"] == pytest.approx(single["loss"], rel=1e-4)
        for bf16 in model[2:]:
            assert bf16["loss"] == pytest.approx(single["loss"], rel=2e-2)


def test_train_profile_reports_phases_and_mfu(tmp_path, capsys):
    from benchmarks import op_profile, train_profile

    out = tmp_path / "profile.json"
    argv = ["--quick", "--repeats", "1", "--profile_steps", "1", "--settings", "float32,bfloat16"]
    assert train_profile.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == [
        ("vae", "float32"), ("vae", "bfloat16"), ("ldm", "float32"), ("ldm", "bfloat16")
    ]  # fmt: skip
    for r in rows:
        assert positive(r["median_s"]) and positive(r["flops"]) and 0 < r["mfu"] < 1.5
        phases = r["breakdown"]["phases"]
        assert set(phases) == set(op_profile.PHASES)
        assert positive(sum(phases["forward"].values()))
        assert positive(sum(phases["backward"].values()))
        total = sum(sum(p.values()) for p in phases.values())
        assert total == pytest.approx(r["breakdown"]["op_time_s"], rel=1e-6)
    assert "MFU" in capsys.readouterr().out


def test_the_accelerator_script_says_when_there_is_none(capsys):
    from benchmarks import accelerator

    assert accelerator.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU or TPU" in err[0]


def test_matmul_peak_and_flops(quick_result):
    case = quick_result["cases"]["matmul_peak"]
    for peak in case["peaks"].values():
        assert positive(peak["flops_per_s"])
    for r in case["rows"]:
        assert positive(r["achieved_flops_per_s"]) and positive(r["fraction_of_peak"])
        # XLA's count and the analytic one agree within 15% (XLA adds elementwise work)
        assert abs(r["flops_xla"] / r["flops_analytic"] - 1) < 0.15
    for dtype in ("float32", "bfloat16"):  # from a profile of the compiled step
        parts = case["breakdown"][dtype]
        assert positive(parts["dense_matmuls"]) and positive(parts["attention_products"])
        assert math.isclose(
            parts["op_time_s"], sum(parts[k] for k in parts if k != "op_time_s"), rel_tol=1e-9
        )
