"""A dataset record that cannot be read back, named in one line (``DamagedRecordError``).

ArrayRecord checks a hash per chunk (one record per chunk here), so a flipped byte, a
truncated or a missing file shows only when that record is read, as e.g. ``Corrupted
Riegeli/records file: chunk data hash mismatch (computed 0x..., stored 0x...), chunk at 3172
with length 187; at byte 3359``. The readers (``tfds_builders.RecordSource``,
``latent_records.LatentSource``) turn that into ``<file>: record <i> of split 'train' is
damaged (<reason>); <what to do>``, so a training run that hits it says which file and
record instead of crashing at the same step on every resume with a bare Riegeli message.
"""

from __future__ import annotations

import re

_RIEGELI_PREFIX = "Corrupted Riegeli/records file: "


class DamagedRecordError(RuntimeError):
    """A record of a dataset file is unreadable: checksum mismatch, truncated or missing file."""


def short_reason(error: BaseException) -> str:
    """The reader's error without its hash values and byte offsets, e.g. ``chunk data hash
    mismatch, chunk at 3172 with length 187``."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.removeprefix(_RIEGELI_PREFIX)
    text = re.sub(r"\s*\(computed [^)]*\)", "", text)
    return text.split("; ")[0] or type(error).__name__


def damaged_record(
    path: str, index: int, split: str, error: BaseException, hint: str, file_index: int | None
) -> DamagedRecordError:
    """The one-line error for record ``index`` of ``split`` (record ``file_index`` of ``path``
    when the split spans several files)."""
    where = f"record {index} of split {split!r}"
    if file_index is not None and file_index != index:
        where += f" (record {file_index} of this file)"
    return DamagedRecordError(f"{path}: {where} is damaged ({short_reason(error)}); {hint}")
