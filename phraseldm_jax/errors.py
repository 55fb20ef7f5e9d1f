"""Errors of the core modules that the converters, loaders and trainer share (no heavy
imports)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A config field is wrong or two fields conflict, found before training starts; the
    message (one line) names the field(s)."""


class CheckpointDamagedError(FileNotFoundError):
    """Every checkpoint step a load or resume could use is damaged; the message (one line)
    names each step and why."""


class WorkdirBusyError(RuntimeError):
    """Another training holds the workdir's lock; the message (one line) names the workdir and
    the holder: ``<workdir> is in use by pid <pid> on <host> since <time> (<command>)``."""


class NonFiniteError(FloatingPointError):
    """A training step's loss or gradients were not finite (``train.nonfinite="stop"``, or too
    many skipped steps in a row); the message (one line) names the step and the last good
    checkpoint."""


class CheckpointMismatchError(ValueError):
    """Tensors and config disagree: lists every missing key, extra key and shape mismatch."""

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        shape_mismatches: Iterable[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shape_mismatches = sorted(shape_mismatches)
        lines = [f"{what}: checkpoint does not match the config"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(
                f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected)
            )
        for key, expected, got in self.shape_mismatches:
            lines.append(f"  shape of {key}: expected {tuple(expected)}, got {tuple(got)}")
        super().__init__("\n".join(lines))

    @property
    def any(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape_mismatches)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, an I/O error); the message (one line)
    names the checkpoint directory, and for a full disk the space needed and free. The
    previous checkpoint is kept; the trainer stops rather than run on without checkpoints."""
