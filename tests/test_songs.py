"""songs.clean_notes: a decoded phrase that repeats ``p- d-`` pairs at one onset, or two slots
of a bar that repeat each other's notes, give one note each in the song and in its MIDI file;
a note held past the song's last bar is cut at its end."""

from __future__ import annotations

import collections

import mido
import pytest

from phraseldm_jax import songs

# Bar 1: the decoder looped on "p-60 d-12" (5 copies at o-0), and the second slot repeats
# the first slot's o-12 note of the same instrument; a longer copy of p-64 (d-24) comes
# second, so the longer one must stay. Bar 2: one note held 80 positions from o-24 (the
# bar ends at 48).
REPEATS = [
    "i-0 o-0 p-60 d-12 p-60 d-12 p-60 d-12 p-60 d-12 p-60 d-12 o-12 p-64 d-12 p-64 d-24",
    "i-0 o-12 p-64 d-12 o-24 p-67 d-12",
    "[INST]",
    "b-1",
    "i-0 o-0 p-72 d-12 o-24 p-72 d-80",
    "[INST]",
    "[INST]",
    "b-1",
]


def _notes(multitrack):
    return [
        (i, track_id, n.onset, n.pitch, n.duration)
        for i, bar in enumerate(multitrack.bars)
        for track_id, track in bar.tracks.items()
        for n in track.notes
    ]


def test_repeats_are_dropped_and_the_last_note_is_cut_at_the_song_end():
    song = songs.song_from_slots(REPEATS)
    assert song.n_bars == 2
    assert song.cleanup == songs.NoteCleanup(duplicates=6, cut_at_end=1)
    assert sorted(_notes(song.multitrack)) == [
        (0, 0, 0, 60, 12),
        (0, 0, 12, 64, 24),  # the longest of the three copies
        (0, 0, 24, 67, 12),
        (1, 0, 0, 72, 12),
        (1, 0, 24, 72, 24),  # cut at the end of bar 2
    ]
    assert song.n_notes == 5
    assert songs.clean_notes(song.multitrack) == songs.NoteCleanup()  # idempotent


def test_notes_held_into_the_next_bar_are_kept_inside_a_song():
    song = songs.song_from_slots(["i-0 o-24 p-60 d-48", "[INST]", "[INST]", "b-1"] * 2)
    assert song.cleanup == songs.NoteCleanup(duplicates=0, cut_at_end=1)
    assert [n[4] for n in _notes(song.multitrack)] == [48, 24]  # only the last one is cut


def _midi_note_spots(path):
    midi = mido.MidiFile(path)
    spots, end = [], 0
    for index, track in enumerate(midi.tracks):
        now = 0
        for message in track:
            now += message.time
            if message.type == "note_on" and message.velocity > 0:
                spots.append((index, now, message.note))
            if message.type in ("note_on", "note_off"):
                end = max(end, now)
    return spots, end, midi.ticks_per_beat


def test_write_midi_writes_each_note_once_and_ends_with_the_last_bar(tmp_path):
    path = str(tmp_path / "song.mid")
    # A text goes through write_midi's own cleaning (no Song on the way).
    songs.write_midi(songs.phrases.slots_to_remiz(REPEATS), path)
    spots, end, ticks_per_beat = _midi_note_spots(path)
    assert len(spots) == 5
    assert max(collections.Counter(spots).values()) == 1
    assert end == 2 * 4 * ticks_per_beat  # the held note ends with bar 2


def test_slot_reading_counts_bars_by_position_up_to_the_first_sep():
    """A bar-line slot decoded as a phrase merges two bars in the token reading (SPEC); the
    slot reading keeps the layout's bars (the bar slot's phrase is not read) and ends at the
    model's first [SEP] slot, the bar it falls in included when it started."""
    note = "i-0 o-0 p-60 d-12"
    slots = [note, "[INST]", "[INST]", "i-13 o-0 p-72 d-6"]  # bar 0: no b-1
    slots += [note, "[INST]", "[INST]", "b-1"]  # bar 1
    slots += [note, "[SEP]", "[SEP]", "[SEP]"] + ["[SEP]"] * 4  # bar 2 ends the song
    tokens = songs.song_from_slots(slots)
    by_slot = songs.song_from_slots(slots, reading="slots")
    assert tokens.n_bars == 1  # bars 0 and 1 merged, bar 2 unfinished
    assert (by_slot.n_bars, by_slot.bars_before_sep) == (3, 3)
    assert by_slot.text == " ".join([note, "b-1"] * 3)
    assert songs.slot_bars(slots[:8] + ["[SEP]"] * 8) == 2
    assert songs.slot_bars([note] * 8) == 2  # no [SEP]: every slot
    with pytest.raises(ValueError, match="reading"):
        songs.song_from_slots(slots, reading="bars")
