"""The markdown tables of the editing benchmark's results (``benchmarks/editing.py``)."""

from __future__ import annotations

from benchmarks import common
from benchmarks.editing_measures import HIGHER_IS_BETTER

RUN_COLUMNS = (
    ("kept_identity", "kept identity"),
    ("exact_length_share", "exact length"),
    ("phrase_fid", "PhraseFID (generated slots)"),
    ("ssm_generated_kept", "bar SSM gen-kept"),
    ("ssm_gap", "SSM gap to real"),
    ("seam_l2", "seam L2"),
    ("seam_l2_gap", "seam L2 gap to real"),
    ("seam_notes_within_spread", "seam notes in spread"),
    ("source_copy_share", "copies of source"),
    ("seconds_per_song", "s / song"),
    ("speed_vs_plain", "x plain time"),
)
COMPARED = {
    "kept_identity": "kept identity",
    "exact_length_share": "exact length",
    "phrase_fid": "PhraseFID",
    "ssm_gap": "SSM gap",
    "seam_l2_gap": "seam L2 gap",
    "seam_notes_within_spread": "seam notes in spread",
    "seconds_per_song": "s / song",
}


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def runs_table(result: dict) -> str:
    """One row per mode and run (real, plain, naive, resample)."""
    rows = []
    for mode, entry in result["modes"].items():
        for name, values in entry.get("variants", {}).items():
            rows.append([mode, name, *(_cell(values.get(key)) for key, _ in RUN_COLUMNS)])
    return common.markdown_table(["mode", "run", *(title for _, title in RUN_COLUMNS)], rows)


def _comparison_cell(entry: dict) -> str:
    if entry["better"] is None:
        return "-"
    text = f"{_cell(entry['naive'])} -> {_cell(entry['resample'])}"
    if entry["relative"] is not None and entry["better"] != "tie":
        text += f" ({100 * entry['relative']:+.0f}%)"
    return f"{text}, {entry['better']}"


def comparison_table(result: dict) -> str:
    """Naive replacement -> resampling per mode and measure, and which is better."""
    rows = []
    for mode, entry in result["modes"].items():
        compared = entry.get("resample_vs_naive")
        if compared:
            rows.append([mode, *(_comparison_cell(compared[key]) for key in HIGHER_IS_BETTER)])
    titles = [COMPARED.get(key, key) for key in HIGHER_IS_BETTER]
    return common.markdown_table(["mode", *titles], rows)


def tables(result: dict) -> str:
    """Both tables, with the settings they were measured with."""
    s = result["settings"]
    head = (
        f"{len(result['songs']['used'])} test songs, {s['sampler']} {s['steps']} steps, "
        f"resample = {s['resample_rounds']} RePaint rounds per step, variation strength "
        f"{s['variation']}, seed {s['seed']}"
    )
    comparison = comparison_table(result)
    return (
        f"{head}\n\n{runs_table(result)}\n\nNaive replacement -> resampling "
        f"(better: lower PhraseFID, gaps and time; higher identity, length and seam "
        f"share):\n\n{comparison}"
    )
