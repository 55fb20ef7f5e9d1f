"""Song assembly: decoded slot strings -> REMI-z song text -> MultiTrack -> MIDI, and back.

A song is the bars before the first ``[SEP]`` (SPEC section 7), or, forced, exactly
``n_bars`` bars read by position from the song layout (``phrases.SLOTS_PER_BAR`` slots per
bar). ``decode_songs`` turns raw latents [num_songs, length, 64] into ``Song`` objects with
any ``PhraseDecoder`` (the PhraseVAE, or a stand-in); ``write_midi`` writes one, transposed,
optionally lasting to the end of its last bar. ``bars_as_song`` turns decoded bar slots back
into a writable song for the VAE commands (MIDI files are read by the datasets' importers).

Notes are cleaned once, where a song's text becomes notes (``clean_notes``, called by
``song_from_slots`` and again, idempotently, by ``write_midi`` for any other MultiTrack): the
PhraseVAE decoder can repeat a ``p- d-`` pair at one onset many times (greedy decoding that
loops until the length limit), and the slots of a bar can repeat each other's notes, which
remi-z turns into stacked copies of one note; and a note held past the end of the song's last
bar would make the file outlast the song. Repeats are dropped (the longest copy stays) and
such notes are cut at the song's end; ``Song.cleanup`` counts both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import mido
import numpy as np

from phraseldm_jax import fileio, phrases
from phraseldm_jax.phrases import SLOTS_PER_BAR
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.vocab import SEP_ID

# How decoded slots become a song (``song_from_slots``): "tokens" = SPEC section 7.
READINGS = ("tokens", "slots")

REFERENCE_TEMPO = 90.0  # bpm the original writes into its MIDI files
POSITIONS_PER_BEAT = 12  # remi-z's onset and duration unit: a 48th note


class PhraseDecoder(Protocol):
    """Anything that turns raw phrase latents [N, 64] into phrase strings (the PhraseVAE)."""

    def decode(self, latents: np.ndarray) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class NoteCleanup:
    """What ``clean_notes`` changed: ``duplicates`` notes dropped (same track, onset and pitch
    as a note kept), ``cut_at_end`` notes shortened (or dropped, when they start there) at the
    end of the song's last bar."""

    duplicates: int = 0
    cut_at_end: int = 0


def _bar_positions(bar) -> float:
    numerator, denominator = bar.time_signature
    return POSITIONS_PER_BEAT * numerator * 4 / denominator


def clean_notes(multitrack: MultiTrack) -> NoteCleanup:
    """Drops repeated notes and cuts notes at the song's end, in place (see the module
    docstring). A note repeats another when its track, onset (from the song's start) and
    pitch are the same; of a group the first in remi-z's order (longest, then loudest) stays.
    Idempotent: a cleaned song gives ``NoteCleanup(0, 0)``."""
    song_end = sum(_bar_positions(bar) for bar in multitrack.bars)
    seen: dict[int, set[tuple[float, int]]] = {}
    duplicates = cut = 0
    bar_start = 0.0
    for bar in multitrack.bars:
        for track_id, track in list(bar.tracks.items()):
            had_notes, kept = bool(track.notes), []
            for note in sorted(track.notes):
                key = (bar_start + note.onset, note.pitch)
                if key in seen.setdefault(track_id, set()):
                    duplicates += 1
                    continue
                room = song_end - key[0]
                if note.duration > room:
                    cut += 1
                    if room < 1:
                        continue
                    note.duration = int(room)
                seen[track_id].add(key)
                kept.append(note)
            if kept != track.notes:
                track.notes = kept
                track.non_empty_pos = sorted({note.onset for note in kept})
                if not track.is_drum:
                    track.avg_pitch = sum(n.pitch for n in kept) / len(kept) if kept else 0
            if had_notes and not kept:
                del bar.tracks[track_id]
        bar_start += _bar_positions(bar)
    return NoteCleanup(duplicates, cut)


@dataclasses.dataclass
class Song:
    """One decoded song. ``slots``: the decoded phrase of every latent; ``text``: the REMI-z
    song string (up to the first ``[SEP]``, or ``n_bars`` bars read by position when the
    length was forced); ``n_bars``: its ``b-1`` count; ``multitrack``: None when remi-z could
    not read ``text`` (``error`` says why); ``bars_before_sep``: the ``b-1`` count before the
    first ``[SEP]``, the length the model itself generated (equal to ``n_bars`` unless
    forced); ``cleanup``: the repeated notes dropped and notes cut at the end (``clean_notes``)
    on the way from ``text`` to ``multitrack``."""

    slots: list[str]
    text: str
    n_bars: int
    multitrack: MultiTrack | None
    error: str = ""
    bars_before_sep: int = 0
    cleanup: NoteCleanup = NoteCleanup()

    @property
    def ended_at_sep(self) -> bool:
        """Whether a decoded ``[SEP]`` ended the song (else its slots ran out)."""
        return any(phrases.SEP_TOKEN in phrases.as_text(t).split() for t in self.slots)

    @property
    def n_notes(self) -> int:
        """Notes of the written song (after ``clean_notes``); 0 when unreadable."""
        if self.multitrack is None:
            return 0
        return sum(len(t.notes) for bar in self.multitrack.bars for t in bar.tracks.values())


def forced_length_text(slots: Sequence[str], n_bars: int) -> str:
    """Exactly ``n_bars`` bars read by position from the song layout: bar k is the tokens of
    slots 4k..4k+2 (the track slots) followed by ``b-1``. Special tokens in those slots
    (``[SEP]``, ``[INST]``, ...) and stray ``b-1`` count as nothing, so a bar the model left
    empty or marked as past the end is an empty (silent) bar; the bar-slot latents are not read.
    """
    if n_bars * SLOTS_PER_BAR > len(slots):
        raise ValueError(f"{n_bars} bars need {n_bars * SLOTS_PER_BAR} slots, got {len(slots)}")
    tokens: list[str] = []
    for bar in range(n_bars):
        for text in slots[bar * SLOTS_PER_BAR : bar * SLOTS_PER_BAR + SLOTS_PER_BAR - 1]:
            tokens += [
                token
                for token in phrases.as_text(text).split()
                if token != phrases.BAR_TOKEN and not token.startswith("[")
            ]
        tokens.append(phrases.BAR_TOKEN)
    return " ".join(tokens)


def slot_bars(slots: Sequence[str]) -> int:
    """Bars of the song layout before its first slot that starts with ``[SEP]``, the bar that
    slot is in included when the song already started it (bars by position: a bar is its
    ``SLOTS_PER_BAR`` slots, whatever its bar slot decoded to)."""
    first = [phrases.as_text(t).split()[:1] == [phrases.SEP_TOKEN] for t in slots]
    end = first.index(True) if any(first) else len(slots)
    return -(-end // SLOTS_PER_BAR)


def song_from_slots(
    slots: Sequence[str], n_bars: int | None = None, *, reading: str = "tokens"
) -> Song:
    """Decoded slot strings -> Song. ``reading`` "tokens" is SPEC section 7's: the tokens
    before the first ``[SEP]``, one bar per ``b-1``; "slots" reads the same song by position
    (``forced_length_text`` up to the model's own end, ``slot_bars``), so a bar slot the
    model decoded as a phrase does not merge two bars. ``n_bars`` forces the length."""
    if reading not in READINGS:
        raise ValueError(f"unknown song reading {reading!r}; use one of {READINGS}")
    natural = phrases.slots_to_remiz(slots)
    if n_bars is None and reading == "slots":
        n_bars = slot_bars(slots)
    text = natural if n_bars is None else forced_length_text(slots, n_bars)
    bars_before_sep = natural.split().count(phrases.BAR_TOKEN)
    if reading == "slots":
        bars_before_sep = slot_bars(slots)
    cleanup = NoteCleanup()
    try:
        multitrack, error = phrases.remiz_to_multitrack(text), ""
    except Exception as err:  # remi-z asserts on some token sequences; report, don't crash
        multitrack, error = None, f"{type(err).__name__}: {err}"
    if multitrack is not None:
        cleanup = clean_notes(multitrack)
    count = text.split().count(phrases.BAR_TOKEN)
    return Song(list(slots), text, count, multitrack, error, bars_before_sep, cleanup)


def song_ends(first_tokens: np.ndarray) -> np.ndarray:
    """[num_songs, length] first decoded token of every slot -> [num_songs] index of each
    song's first slot that starts with ``[SEP]`` (``length`` when none does)."""
    starts_with_sep = np.asarray(first_tokens) == SEP_ID
    return np.where(starts_with_sep.any(1), starts_with_sep.argmax(1), starts_with_sep.shape[1])


def decode_songs(
    decoder: PhraseDecoder,
    latents: np.ndarray,
    n_bars: int | None = None,
    *,
    past_the_end: bool = False,
    reading: str = "tokens",
) -> list[Song]:
    """Raw latents [num_songs, length, 64] -> Songs (the slots decoded in one call);
    ``n_bars`` forces every song's length, ``reading`` says how slots make bars
    (``song_from_slots``).

    A natural-length song stops at its first ``[SEP]``, so when the decoder reports first
    tokens (``PhraseVAEModel.first_tokens``, one greedy step per slot) the slots after a song's
    first slot that starts with ``[SEP]`` are not decoded: same text, bars and MIDI, and an
    undertrained model leaves most of its 512 slots past the end, often as rows that never
    emit ``[EOS]``. Their ``slots`` entries are then ``""`` and the ``[SEP]`` slot's is
    ``"[SEP]"``. ``past_the_end=True`` (or a forced length, which reads slots by position)
    decodes every slot."""
    latents = np.asarray(latents, np.float32)
    n, length, dim = latents.shape
    flat = latents.reshape(n * length, dim)
    if n_bars is not None or past_the_end or not hasattr(decoder, "first_tokens"):
        texts = decoder.decode(flat)
        if len(texts) != n * length:
            raise ValueError(f"decoder returned {len(texts)} phrases for {n * length} latents")
    else:
        ends = song_ends(np.asarray(decoder.first_tokens(flat)).reshape(n, length))
        rows = np.concatenate([i * length + np.arange(end) for i, end in enumerate(ends)])
        decoded = decoder.decode(flat[rows]) if len(rows) else []
        if len(decoded) != len(rows):
            raise ValueError(f"decoder returned {len(decoded)} phrases for {len(rows)} latents")
        texts = [""] * (n * length)
        for row, text in zip(rows, decoded):
            texts[row] = text
        for i, end in enumerate(ends):
            if end < length:
                texts[i * length + end] = phrases.SEP_TOKEN
    return [
        song_from_slots(texts[i * length : (i + 1) * length], n_bars, reading=reading)
        for i in range(n)
    ]


def transpose(multitrack: MultiTrack, semitones: int) -> None:
    """Shifts every non-drum note by ``semitones`` in place, keeping pitches in 0..127 by
    octaves."""
    if semitones == 0:
        return
    for bar in multitrack.bars:
        for track in bar.tracks.values():
            if track.is_drum:
                continue
            for note in track.notes:
                pitch = note.pitch + semitones
                while pitch < 0:
                    pitch += 12
                while pitch > 127:
                    pitch -= 12
                note.pitch = pitch


def _extend_to_last_bar(path: str, multitrack: MultiTrack) -> None:
    """Moves the end of every MIDI track to the end of the song's last bar, so trailing
    silent bars stay in the file (remi-z ends the file at the last note)."""
    midi = mido.MidiFile(path)
    end = 0
    for bar in multitrack.bars:
        numerator, denominator = bar.time_signature
        end += round(midi.ticks_per_beat * numerator * 4 / denominator)
    for track in midi.tracks:
        total = sum(message.time for message in track)
        if track and track[-1].type == "end_of_track" and total < end:
            track[-1].time += end - total
    midi.save(path)


def write_midi(
    song: MultiTrack | str,
    path: str,
    *,
    tempo: float = REFERENCE_TEMPO,
    semitones: int = 0,
    keep_silent_bars: bool = False,
    allow_empty: bool = True,
) -> None:
    """Writes a song (MultiTrack or REMI-z string) as MIDI at ``tempo`` bpm, transposed by
    ``semitones`` (in place), atomically, its notes cleaned first (``clean_notes``, in place;
    nothing to do for a ``Song``'s multitrack). ``keep_silent_bars``: the file lasts to the
    end of the last bar even when it is silent. ``allow_empty=False``: a song without bars is
    a ValueError instead of an empty file."""
    multitrack = phrases.remiz_to_multitrack(song) if isinstance(song, str) else song
    if not allow_empty and not multitrack.bars:
        raise ValueError(f"{path}: the song has no bars (no 'b-1' token), nothing to write")
    clean_notes(multitrack)
    transpose(multitrack, semitones)

    def write(tmp: str) -> None:
        multitrack.to_midi(tmp, tempo=float(tempo), verbose=False)
        if keep_silent_bars:
            _extend_to_last_bar(tmp, multitrack)

    fileio.atomic_write(path, write)


def notes_only(text: str) -> str:
    """A decoded phrase without bar, song or special tokens, so that it stays in its bar."""
    return " ".join(t for t in text.split() if t[:2] in ("i-", "o-", "p-", "d-"))


def bars_as_song(slots: Sequence[str], per_bar: int = SLOTS_PER_BAR) -> list[str]:
    """Decoded bars of ``per_bar`` slots made safe to write: track slots keep only note tokens
    (``[INST]`` when none are left) and every bar ends in ``b-1``, so a stray ``[SEP]`` or
    ``b-1`` in a decoded slot cannot cut the song short or add bars."""
    if len(slots) % per_bar:
        raise ValueError(f"{len(slots)} slot strings are not whole bars of {per_bar}")
    out = []
    for start in range(0, len(slots), per_bar):
        tracks = slots[start : start + per_bar - 1]
        out.extend(notes_only(t) or phrases.INST_TOKEN for t in tracks)
        out.append(phrases.BAR_TOKEN)
    return out
