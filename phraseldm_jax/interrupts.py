"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) as a request to stop a training.

Python's default reactions lose work: SIGTERM ends the process at once, and Ctrl-C raises
``KeyboardInterrupt`` wherever the main thread happens to be (in the middle of a compilation
or a checkpoint save, with Orbax's threads still running). While a ``StopRequest`` is active
the first signal only sets a flag, which the training loop reads between steps: it finishes
the step, saves ``latest`` and returns. A second Ctrl-C exits at once (status 130) for a user
who will not wait. The previous handlers come back when the ``with`` block ends.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signal_name: str) -> int:
    """The shell's status for a process ended by ``signal_name``: 128 + its number."""
    return 128 + signal.Signals[signal_name].value


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print.
    os.write(2, (text + "\n").encode())


class StopRequest:
    """Records the first SIGTERM / SIGINT while active (a context manager).

    Handlers can only be installed from the main thread; elsewhere (a training started from a
    worker thread) the signals keep their previous behaviour.
    """

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum = signum
            again = (
                " (Ctrl-C again exits at once, without saving)" if signum == signal.SIGINT else ""
            )
            _say(f"{name}: stopping after the current step to save a checkpoint{again}")
        elif signum == signal.SIGINT:
            _say("second SIGINT: exiting at once, without saving")
            os._exit(exit_status(name))

    @property
    def signal_name(self) -> str | None:
        """``"SIGTERM"`` / ``"SIGINT"`` once one arrived, else None."""
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self, sync_point: bool) -> bool:
        """Whether the loop stops now. One process: as soon as a signal arrived. Several: all
        decide together at ``sync_point`` steps (logging, evaluation, checkpoints), where the
        loop waits for the devices anyway; the signal of any process stops them all."""
        if jax.process_count() == 1:
            return bool(self.signum)
        if not sync_point:
            return False
        from jax.experimental import multihost_utils

        signums = multihost_utils.process_allgather(np.int32(self.signum))
        self.signum = self.signum or int(np.max(signums))
        return bool(self.signum)
