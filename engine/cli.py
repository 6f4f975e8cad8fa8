"""How entrypoints end when they do not finish: one line on stderr and an exit status, no traceback.

bad input (UserError) and OS errors: `error: ...`, status 2; divergence (Diverged): `error: ...`, status 3; a stop
signal after a checkpoint (Stopped): `stopped: ...`, 128 + the signal. The exceptions live in core.errors, the bottom
layer, and are re-exported here."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from core.errors import Diverged, Stopped, UserError  # re-exported: raised everywhere, caught here


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-usage errors are UserErrors: one `error:` line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and map :class:`UserError` to an `error:` line and exit status 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        one_line = " ".join(part.strip() for part in str(err).splitlines() if part.strip())  # library messages may wrap
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one of them says why
            print(f"error: {one_line}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(Diverged.STATUS)
    except OSError as err:  # the machine, not the code: disk full, read-only or vanished file system, permissions
        if os.environ.get("RANK", "0") == "0":
            where = f" ({err.filename})" if err.filename else ""
            print(f"error: {err.strerror or err}{where}; files written before are intact", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.status)
    except BrokenPipeError:  # output piped into `head` or the like, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
