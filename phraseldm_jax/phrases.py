"""MultiTrack <-> phrases, and the 4-slots-per-bar song layout of the LDM.

A phrase is one track of one bar in REMI-z tokens, instrument first, no velocity, tempo
or time signature: ``i-<prog> o-<pos> p-<pitch> d-<dur> [p- d-]... o- ...`` (SPEC
section 3). remi-z already writes exactly this (``Track.to_remiz_seq(with_velocity=False)``:
one ``o-`` per new position, pitches descending within a position) and keeps a bar's
tracks ordered by average pitch, descending; we rely on both. What remi-z does not do is
leave out tracks without notes (``Bar.to_remiz_str`` writes a bare ``i-25``): we skip them.

Song layout (SPEC section 3): per bar ``n_slots`` (3) track phrases, ``[INST]`` in empty
slots, then ``b-1``, i.e. 4 strings per bar. Slot order ``pitch_order`` (the reference)
fills slots in remi-z order; ``fixed`` puts program ``fixed_programs[k]`` in slot k.
More tracks than slots (possible with the generic MIDI importer): ``pitch_order`` keeps
the first ``n_slots`` tracks in remi-z order (the highest ones) and drops the rest;
``fixed`` drops tracks whose program has no slot. ``dropped_phrases`` counts them.

The reverse (SPEC section 7): decoded slot strings -> one REMI-z song string -> MultiTrack.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from phraseldm_jax.remiz import Bar, MultiTrack, Track

INST_TOKEN = "[INST]"
BAR_TOKEN = "b-1"
SEP_TOKEN = "[SEP]"
SKIPPED_TOKENS = frozenset({"[BOS]", "[EOS]", "[PAD]"})
SLOT_ORDERS = ("pitch_order", "fixed")
POP909_PROGRAMS = (13, 25, 0)  # melody, bridge, piano: the "fixslot" model's slot order
DEFAULT_N_SLOTS = 3
SLOTS_PER_BAR = DEFAULT_N_SLOTS + 1  # the LDM's song layout: three track slots, the bar slot
MAX_BARS = 128  # longest song (SPEC section 3): 512 latents; longer songs are excluded
LENGTH_BUCKET_SIZE = 10  # bars per bucket of the length condition (the original's)

# One bar as (program, phrase) pairs, in remi-z order.
BarPhrases = list[tuple[int, str]]


def length_bucket(n_bars, bucket_size: int = LENGTH_BUCKET_SIZE):
    """Length-condition bucket ``n_bars // bucket_size`` (59 -> 5, 60 -> 6, 69 -> 6, 70 -> 7)
    of an int or an int array (numpy or jax)."""
    return n_bars // bucket_size


def length_bucket_range(n_bars: int, bucket_size: int = LENGTH_BUCKET_SIZE) -> tuple[int, int]:
    """[low, high) bars of the length bucket of ``n_bars``: 64 -> (60, 70)."""
    low = int(length_bucket(int(n_bars), bucket_size)) * bucket_size
    return low, low + bucket_size


def track_phrase(track: Track) -> str:
    """The phrase of one track: ``"i-0 o-0 p-60 d-12 ..."`` (remi-z's own serialisation)."""
    return " ".join(track.to_remiz_seq(with_velocity=False))


def bar_phrases(bar: Bar) -> BarPhrases:
    """(program, phrase) of each non-empty track of ``bar``, in remi-z order."""
    return [(int(t.inst_id), track_phrase(t)) for t in bar.tracks.values() if len(t.notes) > 0]


def multitrack_phrases(song: MultiTrack) -> list[BarPhrases]:
    """``bar_phrases`` of every bar: [n_bars] lists (empty for an empty bar)."""
    return [bar_phrases(bar) for bar in song.bars]


def record_phrases(record: Mapping) -> list[BarPhrases]:
    """Per-bar (program, phrase) lists of a song record (docs/ARCHITECTURE.md "songs")."""
    n_bars = int(record["n_bars"])
    bars: list[BarPhrases] = [[] for _ in range(n_bars)]
    for text, bar, program in zip(
        record["phrases"], record["phrase_bar"], record["phrase_program"], strict=True
    ):
        if not 0 <= int(bar) < n_bars:
            raise ValueError(
                f"song {record.get('song_id', '?')}: phrase bar {int(bar)} is outside 0..{n_bars - 1}"
            )
        bars[int(bar)].append((int(program), as_text(text)))
    return bars


def as_text(text: str | bytes) -> str:
    """A phrase as ``str`` (TFDS sources give ``bytes``)."""
    return text.decode("utf-8") if isinstance(text, bytes) else text


def song_bars(song: MultiTrack | Mapping | Sequence[BarPhrases]) -> list[BarPhrases]:
    """Per-bar (program, phrase) lists of a MultiTrack, a song record or such a list."""
    if isinstance(song, MultiTrack):
        return multitrack_phrases(song)
    if isinstance(song, Mapping):
        return record_phrases(song)
    return [list(bar) for bar in song]


def bar_text(phrases: Iterable[str]) -> str:
    """All track phrases of a bar followed by ``b-1`` (the stage-1 bar line)."""
    return " ".join([*phrases, BAR_TOKEN])


def _select_slots(
    bar: BarPhrases, order: str, fixed_programs: Sequence[int], n_slots: int
) -> tuple[list[str], int]:
    """The ``n_slots`` slot strings of one bar and how many phrases did not fit."""
    if order == "pitch_order":
        kept = [text for _, text in bar[:n_slots]]
        return kept + [INST_TOKEN] * (n_slots - len(kept)), max(0, len(bar) - n_slots)
    if order == "fixed":
        if len(fixed_programs) != n_slots:
            raise ValueError(
                f"fixed slot order needs {n_slots} programs, got {tuple(fixed_programs)}"
            )
        by_program = {program: text for program, text in bar}
        slots = [by_program.get(program, INST_TOKEN) for program in fixed_programs]
        dropped = sum(1 for program, _ in bar if program not in fixed_programs)
        return slots, dropped
    raise ValueError(f"unknown slot order {order!r}; expected one of {SLOT_ORDERS}")


def slot_phrases(
    song: MultiTrack | Mapping | Sequence[BarPhrases],
    order: str = "pitch_order",
    fixed_programs: Sequence[int] = POP909_PROGRAMS,
    n_slots: int = DEFAULT_N_SLOTS,
) -> list[str]:
    """The song as ``(n_slots + 1) * n_bars`` strings: per bar the slots, then ``b-1``.

    Args:
      song: a MultiTrack, a song record, or per-bar (program, phrase) lists.
      order: ``"pitch_order"`` (remi-z order, the reference) or ``"fixed"``.
      fixed_programs: program of each slot for ``order="fixed"``.
      n_slots: phrase slots per bar (3).

    Returns:
      e.g. ``["i-13 o-0 ...", "i-0 o-0 ...", "[INST]", "b-1", ...]``. Phrases that do not
      fit a slot are left out (see the module docstring; ``dropped_phrases`` counts them).
    """
    out: list[str] = []
    for bar in song_bars(song):
        slots, _ = _select_slots(bar, order, fixed_programs, n_slots)
        out.extend(slots)
        out.append(BAR_TOKEN)
    return out


def dropped_phrases(
    song: MultiTrack | Mapping | Sequence[BarPhrases],
    order: str = "pitch_order",
    fixed_programs: Sequence[int] = POP909_PROGRAMS,
    n_slots: int = DEFAULT_N_SLOTS,
) -> int:
    """How many phrases of ``song`` ``slot_phrases`` leaves out with these settings."""
    return sum(_select_slots(bar, order, fixed_programs, n_slots)[1] for bar in song_bars(song))


def slots_to_remiz(slot_texts: Iterable[str]) -> str:
    """Decoded slot strings -> one REMI-z song string (SPEC section 7).

    Tokens are concatenated in order; ``[BOS] [EOS] [PAD]`` are skipped, ``[INST]`` (an
    empty slot) and any other bracketed special token are dropped, and everything from the
    first ``[SEP]`` (end of song) on is ignored.
    """
    tokens: list[str] = []
    for text in slot_texts:
        for token in as_text(text).split():
            if token == SEP_TOKEN:
                return " ".join(tokens)
            if token in SKIPPED_TOKENS or token == INST_TOKEN or token.startswith("["):
                continue
            tokens.append(token)
    return " ".join(tokens)


def count_bars(slot_texts: Iterable[str]) -> int:
    """Number of bars of a decoded song: the ``b-1`` tokens before the first ``[SEP]``."""
    return slots_to_remiz(slot_texts).split().count(BAR_TOKEN)


def remiz_to_multitrack(text: str) -> MultiTrack:
    """A REMI-z song string -> MultiTrack.

    Tokens after the last ``b-1`` (an unfinished bar) are ignored, as remi-z does; a
    string without any ``b-1`` gives a song without bars.
    """
    if BAR_TOKEN not in text.split():
        return MultiTrack(bars=[])
    return MultiTrack.from_remiz_str(text, verbose=False)


def slots_to_multitrack(slot_texts: Iterable[str]) -> MultiTrack:
    """``remiz_to_multitrack(slots_to_remiz(slot_texts))``."""
    return remiz_to_multitrack(slots_to_remiz(slot_texts))
