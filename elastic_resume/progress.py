"""Progress bars for long work (``verify``, ``prune``, ``export``, a large restore), drawn by tqdm
on stderr only when a person is watching: stdout and stderr are a terminal. Nothing is drawn into
a pipe, a log file or ``--json`` output (what is printed there is for a program to read)."""

from __future__ import annotations

import sys
from typing import Any

#: A restore draws a bar (on a terminal) from this many bytes on: smaller ones take a moment.
RESTORE_BAR_BYTES = 256 << 20


def on_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressBar:
    """``bar(done, total)`` redraws; ``close()`` clears it. Inert when not ``enabled``."""

    def __init__(self, what: str, *, unit: str = "B", enabled: bool | None = None) -> None:
        self.on = on_terminal() if enabled is None else enabled
        self.what, self.unit = what, unit
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.on:
            return
        if self.bar is None:
            from tqdm import tqdm

            in_bytes = self.unit == "B"
            self.bar = tqdm(total=total, unit=self.unit, unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000,
                            desc=self.what, file=sys.stderr, leave=False)
        self.bar.total = max(total, done)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
