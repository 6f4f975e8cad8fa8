"""How entrypoints end when they do not finish: one line on stderr and an exit status, no traceback.

a question answered (Answered: --help, --print-config): the text on stdout, status 0;
bad input (UserError) and OS errors: `error: ...`, status 2; divergence (Diverged): `error: ...`, status 3; a finished
run whose embeddings collapsed (Collapsed): `error: ...`, status 4; a stop
signal after a checkpoint (Stopped): `stopped: ...`, 128 + the signal. The exceptions live in core.errors, the bottom
layer, and are re-exported here."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from core.errors import Answered, Collapsed, Diverged, Stopped, UserError  # raised everywhere, caught here


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-usage errors are UserErrors: one `error:` line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)``; turn the ways it can end early into one line on stderr and an exit status (module
    docstring). Programming errors keep their tracebacks."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except Answered as answer:
        _answer(answer.text)
    except UserError as err:
        _end("error: " + " ".join(part.strip() for part in str(err).splitlines() if part.strip()), 2)  # may wrap
    except Diverged as err:
        _end(f"error: {err}", Diverged.STATUS)
    except Collapsed as err:
        _end(f"error: {err}", Collapsed.STATUS)
    except Stopped as stopped:
        _end(f"stopped: {stopped}", stopped.status)
    except BrokenPipeError:  # output piped into `head` or the like, which stopped reading: end quietly
        _quiet_end(1)
    except OSError as err:  # the machine, not the code: disk full, read-only or vanished file system, permissions
        where = f" ({err.filename})" if err.filename else ""
        _end(f"error: {err.strerror or err}{where}; files written before are intact", 2)
    except KeyboardInterrupt:
        _end("error: interrupted", 130)


def _answer(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `pretrain.py --help | head`: the reader had enough
        _quiet_end(0)
    sys.exit(0)


def _quiet_end(status: int) -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
    sys.exit(status)


def _end(line: str, status: int) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank ends alike; one of them says why
        print(line, file=sys.stderr, flush=True)
    sys.exit(status)
