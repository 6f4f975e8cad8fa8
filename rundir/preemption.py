"""Stop cleanly on the signals a cluster sends before it kills a job: finish the step, checkpoint, exit for requeue.

SLURM sends SIGTERM (or the signal chosen with ``--signal``, often SIGUSR1) some time before SIGKILL; Ctrl-C sends
SIGINT. Instead of dying mid-step, training records the signal and polls it between steps; the loop then writes a
checkpoint at the current step and raises :class:`rundir.cli.Stopped`, whose exit status is 128 + the signal number
(143 SIGTERM, 138 SIGUSR1, 130 SIGINT). The same command continues from that step.
"""
from __future__ import annotations

import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Records the first stop signal instead of dying; ``with StopRequest() as stop:`` installs the handlers and
    restores the previous ones on exit. A second SIGINT interrupts at once (someone at the keyboard insists)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): keep the defaults
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
