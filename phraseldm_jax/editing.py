"""Editing whole songs with a PhraseLDM: continue, infill bars, accompany kept tracks, exact
length, variations.

A song comes from a MIDI file (``import_song``: the importer ``prepare`` uses for it, POP909's
for a POP909 song folder, else ``input_pipeline.midi_folder`` with the key normalised to C
major / A minor; ``SourceSong.key_shift`` and ``tempo`` put them back when writing), or from a
song record already imported (``song_from_record``: a prepared ``songs`` dataset's) and becomes
its slot strings in the model's slot order (``phrases.slot_phrases``), encoded by the PhraseVAE
to raw posterior means, as the latent dataset was built.

``plan_edit`` turns a song, a target length and what to keep (``KeepSpec``) into an
``EditPlan``: the reference latents of every slot (the song's bars, ``[INST]`` / ``b-1`` for
bars past its end, the ``[SEP]`` pad from bar n+1 on, in the model's space as the data pipeline
scales them) and the mask of the kept slots, which the sampler keeps at every step
(``sampler.LatentSampler(..., song, mask)``):

- ``bars``: every slot of those bars (continuation: bars 1..k of n; infill: all but some).
- ``programs`` (accompaniment): the slots the track holds. In the ``pitch_order`` layout a
  track's slot moves from bar to bar (slots follow the bar's average pitches), so the mask
  follows the slots the track actually occupies in each bar, and a bar without the track keeps
  nothing of it. In the ``fixed`` layout the track owns one slot, kept in every bar: its phrase,
  or ``[INST]`` where the song has none (the silence is kept too).
- exact length (``exact_length``, always with a song): the ``b-1`` slot of bars 1..n and every
  slot from bar n+1 on (the ``[SEP]`` pad the model was trained to end songs with), so the
  song ends after bar n without reading it by position (``--force_length``).

A variation (SDEdit, ``SamplerSettings.strength``) starts from the noised reference latents.
After sampling, ``EditPlan.restore`` writes the encoded latents back into the kept slots, so
they decode to the PhraseVAE's reconstruction of the input phrases exactly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from phraseldm_jax import phrases
from phraseldm_jax.phrases import SLOTS_PER_BAR

TRACK_SLOTS = SLOTS_PER_BAR - 1
KEEP_KINDS = ("bars", "tracks")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class EditError(ValueError):
    """An edit that cannot be made (a bad keep spec, a MIDI file the importer rejects, ...);
    the message is one line naming the input and the problem."""


class PhraseEncoder(Protocol):
    """Anything that encodes phrase strings to raw latents (the PhraseVAE)."""

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class SourceSong:
    """An imported song: its record (docs/ARCHITECTURE.md "songs"), its slot strings
    (``SLOTS_PER_BAR`` per bar) in ``slot_order`` and the program each slot holds (None for
    ``[INST]`` and ``b-1``)."""

    path: str
    record: dict
    slots: tuple[str, ...]
    slot_programs: tuple[int | None, ...]
    slot_order: str

    @property
    def n_bars(self) -> int:
        return len(self.slots) // SLOTS_PER_BAR

    @property
    def key_shift(self) -> int:
        """Semitones the key normalisation moved the song (undo with ``-key_shift``)."""
        return int(self.record["key_shift"])

    @property
    def tempo(self) -> float:
        return float(self.record["tempo"])

    @property
    def programs(self) -> list[int]:
        """The programs the slots hold, sorted."""
        return sorted({p for p in self.slot_programs if p is not None})


def _is_pop909_song(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) == f"{os.path.basename(folder)}.mid" and os.path.isfile(
        os.path.join(folder, "beat_midi.txt")
    )


def import_record(path: str) -> dict:
    """The song record of MIDI file ``path`` with its key normalised: POP909's importer for a
    POP909 song folder, else ``midi_folder.import_file``. ``EditError`` when it cannot be used."""
    from input_pipeline import midi_folder, pop909

    if _is_pop909_song(path):
        try:
            return pop909.import_song(os.path.dirname(os.path.abspath(path)))
        except ValueError as error:
            raise EditError(str(error)) from None
    try:
        shared = midi_folder.shared_programs(path)
        if shared:
            program, names = next(iter(shared.items()))
            raise EditError(
                f"{path}: tracks {names} share program {program}; a bar keeps one phrase per "
                "program, so they would merge (give each track its own program)"
            )
        return midi_folder.import_file(path, normalize_key=True)
    except midi_folder.MidiSkip as error:
        raise EditError(str(error)) from None


def _slot_programs(record: dict, slot_order: str) -> list[int | None]:
    """The program of every slot ``phrases.slot_phrases`` writes (None: ``[INST]``, ``b-1``)."""
    out: list[int | None] = []
    for bar in phrases.song_bars(record):
        if slot_order == "fixed":
            present = {program for program, _ in bar}
            out += [p if p in present else None for p in phrases.POP909_PROGRAMS]
        else:
            kept = [program for program, _ in bar[:TRACK_SLOTS]]
            out += kept + [None] * (TRACK_SLOTS - len(kept))
        out.append(None)
    return out


def song_from_record(record: dict, slot_order: str = "pitch_order", path: str = "") -> SourceSong:
    """A song record (one ``import_record`` returns, or one of a prepared ``songs`` dataset)
    -> ``SourceSong`` with its slots in ``slot_order``; ``path`` names it in errors."""
    if slot_order not in phrases.SLOT_ORDERS:
        raise EditError(f"unknown slot order {slot_order!r}; use one of {phrases.SLOT_ORDERS}")
    if int(record["n_bars"]) < 1:
        raise EditError(f"{path or record.get('song_id', 'the song')}: the song has no bars")
    slots = phrases.slot_phrases(record, slot_order, fixed_programs=phrases.POP909_PROGRAMS)
    programs = _slot_programs(record, slot_order)
    return SourceSong(path, record, tuple(slots), tuple(programs), slot_order)


def import_song(path: str, slot_order: str = "pitch_order") -> SourceSong:
    """MIDI file -> ``SourceSong`` (``import_record``, then the slots in ``slot_order``)."""
    if slot_order not in phrases.SLOT_ORDERS:
        raise EditError(f"unknown slot order {slot_order!r}; use one of {phrases.SLOT_ORDERS}")
    return song_from_record(import_record(path), slot_order, path)


@dataclasses.dataclass(frozen=True)
class KeepSpec:
    """What to keep: bar numbers (1-based) and track programs."""

    bars: tuple[int, ...] = ()
    programs: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.bars or self.programs)


def parse_keep(specs: Sequence[str]) -> KeepSpec:
    """``["bars:1-8,17-32", "tracks:13"]`` -> KeepSpec (the union). ``EditError`` naming the
    spec for anything else."""
    bars: set[int] = set()
    programs: set[int] = set()
    for spec in specs:
        kind, colon, items = spec.partition(":")
        if not colon or kind not in KEEP_KINDS or not items.strip():
            raise EditError(
                f"--keep {spec!r}: expected bars:<ranges> or tracks:<programs>, e.g. "
                "bars:1-8,17-32 or tracks:13"
            )
        for item in items.split(","):
            match = _RANGE.fullmatch(item.strip())
            if kind == "tracks":
                if not item.strip().isdigit() or not 0 <= int(item) <= 128:
                    raise EditError(f"--keep {spec!r}: {item!r} is not a program (0..128)")
                programs.add(int(item))
                continue
            if not match:
                raise EditError(f"--keep {spec!r}: {item!r} is not a bar or a range like 1-8")
            low, high = int(match[1]), int(match[2] or match[1])
            if low < 1 or high < low:
                raise EditError(f"--keep {spec!r}: bad bar range {item!r} (bars count from 1)")
            bars.update(range(low, high + 1))
    return KeepSpec(tuple(sorted(bars)), tuple(sorted(programs)))


def check_keep(keep: KeepSpec, song: SourceSong, n_bars: int) -> None:
    """``EditError`` for kept bars outside the song or past ``n_bars``, and for a kept track
    the song's slots do not hold."""
    name = os.path.basename(song.path)
    outside = [b for b in keep.bars if b > song.n_bars]
    if outside:
        raise EditError(f"--keep bars:{outside[0]}: {name} has {song.n_bars} bars")
    past = [b for b in keep.bars if b > n_bars]
    if past:
        raise EditError(f"--keep bars:{past[0]}: the edited song has {n_bars} bars (--bars)")
    for program in keep.programs:
        if program not in song.programs:
            raise EditError(
                f"--keep tracks:{program}: {name} has no track with program {program} in its "
                f"slots (it has {', '.join(map(str, song.programs))})"
            )


@dataclasses.dataclass(frozen=True)
class EditPlan:
    """One edit: ``latents`` [length, dim] raw reference latents of every slot, ``model``
    the same in the model's space (scaled; the ``[SEP]`` pad as the data pipeline pads),
    ``mask`` [length] bool (True = kept), ``n_bars`` the edited song's length, ``slots`` the
    reference slot strings ``latents`` encode (what a kept slot must decode to, through the
    PhraseVAE's reconstruction), ``exact_length`` whether the bar layout (``b-1`` slots and
    ``[SEP]`` tail) is kept: then the song is read by that layout (``songs.decode_songs`` with
    ``n_bars``), so stray ``b-1`` / ``[SEP]`` tokens decoded in generated slots cannot add or
    cut bars."""

    latents: np.ndarray
    model: np.ndarray
    mask: np.ndarray
    n_bars: int
    slots: tuple[str, ...] = ()
    exact_length: bool = False

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(song [n, length, dim], mask [n, length]) for ``LatentSampler``."""
        return np.repeat(self.model[None], n, 0), np.repeat(self.mask[None], n, 0)

    def restore(self, raw: np.ndarray) -> np.ndarray:
        """Sampled raw latents [n, length, dim] with the kept slots set to the encoded ones."""
        return np.where(self.mask[None, :, None], self.latents[None], raw).astype(np.float32)

    @property
    def kept_slots(self) -> int:
        return int(self.mask.sum())


def encode_texts(encoder: PhraseEncoder, texts: Sequence[str]) -> np.ndarray:
    """Raw posterior means [len(texts), dim], each distinct string encoded once."""
    distinct = sorted(set(texts))
    means = np.asarray(encoder.encode(distinct)[0], np.float32)
    row = {text: i for i, text in enumerate(distinct)}
    return means[[row[t] for t in texts]]


def _reference_slots(song: SourceSong | None, n_bars: int, length: int) -> list[str]:
    """The slot strings of the reference: the song's first ``n_bars`` bars, empty bars past
    its end, the ``[SEP]`` pad after bar ``n_bars``."""
    slots = list(song.slots[: n_bars * SLOTS_PER_BAR]) if song is not None else []
    empty_bar = [phrases.INST_TOKEN] * TRACK_SLOTS + [phrases.BAR_TOKEN]
    slots += empty_bar * (n_bars - len(slots) // SLOTS_PER_BAR)
    return slots + [phrases.SEP_TOKEN] * (length - len(slots))


def _kept_mask(song, keep: KeepSpec, n_bars: int, length: int, exact_length: bool):
    mask = np.zeros(length, bool)
    for bar in keep.bars:
        mask[(bar - 1) * SLOTS_PER_BAR : bar * SLOTS_PER_BAR] = True
    if keep.programs:
        bars = min(n_bars, song.n_bars)
        for index, program in enumerate(song.slot_programs[: bars * SLOTS_PER_BAR]):
            mask[index] |= program in keep.programs
        if song.slot_order == "fixed":  # the track's own slot in every bar, [INST] included
            for program in keep.programs:
                if program in phrases.POP909_PROGRAMS:
                    column = phrases.POP909_PROGRAMS.index(program)
                    mask[column : bars * SLOTS_PER_BAR : SLOTS_PER_BAR] = True
    if exact_length:
        mask[SLOTS_PER_BAR - 1 : n_bars * SLOTS_PER_BAR : SLOTS_PER_BAR] = True  # b-1 slots
        mask[n_bars * SLOTS_PER_BAR :] = True  # the [SEP] tail
    return mask


def plan_edit(
    encoder: PhraseEncoder,
    *,
    length: int,
    scale_factor: float,
    n_bars: int | None = None,
    song: SourceSong | None = None,
    keep: KeepSpec = KeepSpec(),
    exact_length: bool = True,
    reference_padding: bool = False,
) -> EditPlan:
    """The ``EditPlan`` of an edit (module docstring).

    Args:
      encoder: the PhraseVAE (``encode``) the LDM's latents came from.
      length: slots the model generates (``config.dit.sample_size``).
      scale_factor: the LDM's; model latents = raw / scale_factor.
      n_bars: bars of the edited song; default the song's length.
      song: the song to edit, or None (a new song: only exact length makes sense).
      keep: bars and tracks to keep (checked against the song: ``check_keep``).
      exact_length: keep the ``b-1`` slots of bars 1..n and the ``[SEP]`` tail after bar n.
      reference_padding: the model was trained with the unscaled ``[SEP]`` pad (the original).
    """
    n_bars = n_bars if n_bars is not None else (song.n_bars if song is not None else None)
    if n_bars is None:
        raise EditError("an edit without a song needs a length (--bars)")
    max_bars = length // SLOTS_PER_BAR
    if not 1 <= n_bars <= max_bars:
        raise EditError(f"{n_bars} bars requested but the model generates at most {max_bars}")
    if keep and song is None:
        raise EditError("--keep needs a song to keep from (--from)")
    if song is not None:
        check_keep(keep, song, n_bars)
    slots = _reference_slots(song, n_bars, length)
    raw = encode_texts(encoder, slots)
    model = raw / np.float32(scale_factor)
    if reference_padding:
        tail = np.asarray(slots) == phrases.SEP_TOKEN
        model[tail] = raw[tail]
    mask = _kept_mask(song, keep, n_bars, length, exact_length)
    return EditPlan(raw, model.astype(np.float32), mask, n_bars, tuple(slots), exact_length)
