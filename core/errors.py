"""The exceptions every layer may raise and only the entrypoints turn into output (rundir.cli.run_cli)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the person running the command (config, data, checkpoint, hardware request).

    Raised anywhere; turned into a single `error: ...` line by :func:`rundir.cli.run_cli`. Programming errors keep
    their tracebacks.
    """


class Diverged(Exception):
    """Training diverged (a non-finite loss, weight or statistic): a result, recorded in summary.json, not bad
    input. run_cli prints ``error: <message>`` and exits with :attr:`STATUS`, which tells it apart from status 2."""

    STATUS = 3


class Collapsed(Exception):
    """Training finished but its embeddings collapsed (training.pretraining: an effective rank below the measured
    threshold): a result, recorded as ``status: collapsed`` in summary.json, whose encoder is kept for
    inspection. run_cli prints ``error: <message>`` and exits with :attr:`STATUS`."""

    STATUS = 4


class Stopped(Exception):
    """A run stopped on request (a preemption signal) after saving what it needs to continue: not a failure, but
    the job did not finish. run_cli prints ``stopped: <message>`` and exits with ``status`` (128 + the signal)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Answered(Exception):
    """The command line asked a question (``--help``, ``--print-config``) whose answer is the whole job: run_cli prints
    the text on stdout and exits 0 without running anything."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
