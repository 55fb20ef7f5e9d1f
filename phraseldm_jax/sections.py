"""Section plans: parse, validate, turn into section-encoder ids.

A section plan lists the sections of a song in order, each a type letter and a length in
bars: POP909's ``human_label1.txt`` writes it compactly (``i8A8A8B4B4x4``), the LDM's
section encoder reads it spaced (``i-8 A-8 A-8 B-4 B-4 x-4``, our canonical string form).
Types are ``i o A B C D E X x b c`` (intro, outro, melodic sections A-E, non-repeated
melodic ``X``, non-melodic ``x``/``b``/``c``), lengths 1..32 bars, at most 30 sections
(the section encoder's fixed length), at most 128 bars in all (the LDM's song length).

Section ids (SPEC section 5): the original numbered types and lengths by Python set order,
which changes from process to process, so the mapping its checkpoints were trained with
is lost. We fix one order (``DEFAULT_SECTION_VOCAB``: types sorted by character code,
lengths numerically; ids from 1, 0 = pad) and ``SectionVocab.from_orders`` accepts any
other explicit order, e.g. one exported together with converted weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from phraseldm_jax.phrases import MAX_BARS

SECTION_TYPES: tuple[str, ...] = tuple(sorted("ioABCDEXxbc"))  # A B C D E X b c i o x
MIN_SECTION_LENGTH = 1
MAX_SECTION_LENGTH = 32
MAX_SECTIONS = 30
MAX_PLAN_BARS = MAX_BARS  # a plan covers at most a whole song
PAD_ID = 0

_COMPACT_ITEM = re.compile(r"([A-Za-z])(\d+)")
_SPACED_ITEM = re.compile(r"([A-Za-z])-(\d+)")


class SectionPlanError(ValueError):
    """A section plan that cannot be used (malformed, invalid or inconsistent)."""


@dataclasses.dataclass(frozen=True)
class Section:
    """One section: its type letter and its length in bars."""

    type: str
    length: int


@dataclasses.dataclass(frozen=True)
class SectionPlan:
    """A validated sequence of sections."""

    sections: tuple[Section, ...]

    @property
    def n_bars(self) -> int:
        """Total length of the plan in bars."""
        return sum(s.length for s in self.sections)

    def __len__(self) -> int:
        return len(self.sections)

    def __str__(self) -> str:
        return self.to_string()

    def to_string(self) -> str:
        """Canonical spaced form, e.g. ``"i-8 A-8 B-4"``."""
        return " ".join(f"{s.type}-{s.length}" for s in self.sections)

    def to_compact(self) -> str:
        """POP909's compact form, e.g. ``"i8A8B4"``."""
        return "".join(f"{s.type}{s.length}" for s in self.sections)

    def section_bounds(self) -> list[tuple[int, int]]:
        """``(first_bar, end_bar)`` of each section, end exclusive."""
        bounds, start = [], 0
        for s in self.sections:
            bounds.append((start, start + s.length))
            start += s.length
        return bounds


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _split_items(text: str, source: str | None) -> list[tuple[str, str]]:
    """Splits plan text into (type, length) strings, in the compact or the spaced form."""
    stripped = text.strip()
    if not stripped:
        raise SectionPlanError(f"{_where(source)}empty section plan")
    if "-" in stripped:
        items = []
        for token in stripped.split():
            match = _SPACED_ITEM.fullmatch(token)
            if match is None:
                raise SectionPlanError(
                    f"{_where(source)}malformed section {token!r} in plan {text!r} "
                    "(expected <type>-<length>, e.g. 'A-8')"
                )
            items.append(match.groups())
        return items
    compact = "".join(stripped.split())
    items, position = [], 0
    for match in _COMPACT_ITEM.finditer(compact):
        if match.start() != position:
            break
        items.append(match.groups())
        position = match.end()
    if position != len(compact):
        raise SectionPlanError(
            f"{_where(source)}malformed section plan {text!r}: cannot read "
            f"{compact[position:][:12]!r} (expected e.g. 'i8A8B4' or 'i-8 A-8 B-4')"
        )
    return items


def parse_plan(
    text: str,
    *,
    max_bars: int = MAX_PLAN_BARS,
    n_bars: int | None = None,
    source: str | None = None,
) -> SectionPlan:
    """Parses and validates a plan in either form.

    Args:
      text: ``"i8A8A8B4"`` or ``"i-8 A-8 A-8 B-4"`` (surrounding whitespace is ignored).
      max_bars: longest plan accepted (default: the LDM's 128 bars; an importer may pass
        a larger limit to keep long annotated songs and mark them itself).
      n_bars: when given, the plan must cover exactly this many bars.
      source: where the text came from (a file, a record), quoted in errors.

    Raises:
      SectionPlanError: malformed text, unknown type, length outside 1..32, more than 30
        sections, more than ``max_bars`` bars, or a total different from ``n_bars``.
    """
    where = _where(source)
    text = text.strip()
    sections = []
    for number, (kind, length_text) in enumerate(_split_items(text, source), start=1):
        if kind not in SECTION_TYPES:
            raise SectionPlanError(
                f"{where}unknown section type {kind!r} (section {number} of plan {text!r}); "
                f"known types: {' '.join(SECTION_TYPES)}"
            )
        length = int(length_text)
        if not MIN_SECTION_LENGTH <= length <= MAX_SECTION_LENGTH:
            raise SectionPlanError(
                f"{where}section {number} ({kind}{length_text}) of plan {text!r} is {length} "
                f"bars long; lengths must be {MIN_SECTION_LENGTH}..{MAX_SECTION_LENGTH}"
            )
        sections.append(Section(kind, length))
    plan = SectionPlan(tuple(sections))
    if len(plan) > MAX_SECTIONS:
        raise SectionPlanError(
            f"{where}plan {text!r} has {len(plan)} sections; at most {MAX_SECTIONS} are allowed"
        )
    if plan.n_bars > max_bars:
        raise SectionPlanError(
            f"{where}plan {text!r} covers {plan.n_bars} bars; at most {max_bars} are allowed"
        )
    if n_bars is not None and plan.n_bars != n_bars:
        raise SectionPlanError(
            f"{where}plan {text!r} covers {plan.n_bars} bars but the song has {n_bars}"
        )
    return plan


def canonical_plan(text: str, **kwargs) -> str:
    """``parse_plan(text, **kwargs).to_string()``: the canonical spaced form."""
    return parse_plan(text, **kwargs).to_string()


@dataclasses.dataclass(frozen=True)
class SectionVocab:
    """Section type and length strings -> embedding row ids (1-based, 0 = pad)."""

    type_to_id: Mapping[str, int]
    length_to_id: Mapping[str, int]

    @classmethod
    def from_orders(
        cls, type_order: Sequence[str], length_order: Sequence[str | int]
    ) -> SectionVocab:
        """Ids 1, 2, ... in the given orders (e.g. the set order of a PyTorch process).

        Args:
          type_order: the 11 section types, each once, in id order.
          length_order: the lengths 1..32 (strings or ints), each once, in id order.
        """
        types = [str(t) for t in type_order]
        if sorted(types) != sorted(SECTION_TYPES):
            raise SectionPlanError(
                f"section type order {''.join(types)!r} must list each of "
                f"{''.join(SECTION_TYPES)!r} exactly once"
            )
        lengths = [str(int(n)) for n in length_order]
        expected = [str(n) for n in range(MIN_SECTION_LENGTH, MAX_SECTION_LENGTH + 1)]
        if sorted(lengths, key=int) != expected:
            raise SectionPlanError(
                f"section length order must list each of 1..{MAX_SECTION_LENGTH} exactly once"
            )
        return cls(
            type_to_id={t: i + 1 for i, t in enumerate(types)},
            length_to_id={n: i + 1 for i, n in enumerate(lengths)},
        )

    @property
    def n_type_ids(self) -> int:
        """Rows of the type embedding (pad included): 12."""
        return len(self.type_to_id) + 1

    @property
    def n_length_ids(self) -> int:
        """Rows of the length embedding (pad included): 33."""
        return len(self.length_to_id) + 1


DEFAULT_SECTION_VOCAB = SectionVocab.from_orders(
    SECTION_TYPES, range(MIN_SECTION_LENGTH, MAX_SECTION_LENGTH + 1)
)


def _as_plan(plan: SectionPlan | str) -> SectionPlan:
    return parse_plan(plan) if isinstance(plan, str) else plan


def plan_to_ids(
    plan: SectionPlan | str,
    vocab: SectionVocab = DEFAULT_SECTION_VOCAB,
    max_sections: int = MAX_SECTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded id arrays for the section encoder.

    Returns:
      type_ids: [max_sections] int32, 0 after the last section.
      length_ids: [max_sections] int32, 0 after the last section.
      mask: [max_sections] bool, True for real sections.
    """
    plan = _as_plan(plan)
    if len(plan) > max_sections:
        raise SectionPlanError(
            f"plan {plan.to_string()!r} has {len(plan)} sections; at most {max_sections} fit"
        )
    type_ids = np.full((max_sections,), PAD_ID, np.int32)
    length_ids = np.full((max_sections,), PAD_ID, np.int32)
    for i, section in enumerate(plan.sections):
        type_ids[i] = vocab.type_to_id[section.type]
        length_ids[i] = vocab.length_to_id[str(section.length)]
    mask = np.arange(max_sections) < len(plan)
    return type_ids, length_ids, mask


def plans_to_ids(
    plans: Sequence[SectionPlan | str],
    vocab: SectionVocab = DEFAULT_SECTION_VOCAB,
    max_sections: int = MAX_SECTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``plan_to_ids`` for a batch: arrays of shape [batch, max_sections]."""
    rows = [plan_to_ids(p, vocab, max_sections) for p in plans]
    if not rows:
        empty = np.zeros((0, max_sections), np.int32)
        return empty, empty.copy(), np.zeros((0, max_sections), bool)
    return tuple(np.stack(column) for column in zip(*rows))


def bar_section_index(plan: SectionPlan | str, n_bars: int | None = None) -> np.ndarray:
    """Index of the section each bar belongs to.

    Args:
      plan: the plan.
      n_bars: length of the result; bars past the end of the plan get -1. Defaults to
        the plan's length.

    Returns:
      [n_bars] int32, e.g. ``"i-2 A-3"`` -> ``[0, 0, 1, 1, 1]``.
    """
    plan = _as_plan(plan)
    lengths = np.array([s.length for s in plan.sections], np.int64)
    index = np.repeat(np.arange(len(plan), dtype=np.int32), lengths)
    n_bars = plan.n_bars if n_bars is None else n_bars
    if n_bars <= len(index):
        return index[:n_bars]
    return np.concatenate([index, np.full((n_bars - len(index),), -1, np.int32)])
