"""JSON-lines output of the benchmark scripts: one object per line on stdout, and appended to a file when asked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union


def emit(row: dict, path: Optional[Union[str, Path]] = None) -> None:
    """Print ``row`` as one JSON line (flushed: a killed run keeps what it printed) and append it to ``path``."""
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
