"""What a run reports, and the progress bar that watches it (shared by both executors)."""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def escape(s: str, limit: int = 400) -> str:
    """Metadata from strangers: control and format characters escaped, so nothing reaches the terminal raw."""
    out = []
    for ch in s[:limit]:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or ch in "\u2028\u2029":
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    more = f"... ({len(s)} chars)" if len(s) > limit else ""
    return "".join(out) + more


@dataclass
class Report:
    """What a run did."""

    output: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    threads: int
    kernel: str
    device: str = "cpu"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Input gigabytes per second."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["output"] = os.fspath(self.output)
        d["gbps"] = round(self.gbps, 3)
        return d


class ProgressBar:
    """A tqdm bar over input bytes, shown only on a terminal (and when asked)."""

    def __init__(self, enabled: bool, desc: str):
        self.bar = None
        self._shown = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            try:  # a terminal that reports no size (a fresh pty) would get no bar at all
                sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
            except OSError:
                sized = False
            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc=escape(desc, 60), leave=False, file=sys.stderr,
                            **({} if sized else {"ncols": 80, "nrows": 24}))

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            now = time.monotonic()
            if now - self._shown >= 0.1 or done >= total:  # many small steps: redraw ten times a second
                self._shown = now
                self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Meter:
    """One byte-progress bar for a command that makes several passes (file hashes, then content
    hashes): each pass reports through :meth:`part`, then :meth:`advance` moves the base past it.
    Shown only on a terminal, like :class:`ProgressBar`."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = ProgressBar(enabled, desc)
        self.total = total
        self.base = 0

    def part(self):
        """The ``progress(done, total)`` callback for the next pass, or None when quiet."""
        if self.bar.bar is None:
            return None
        base = self.base
        return lambda done, _total: self.bar(base + done, self.total)

    def advance(self, nbytes: int) -> None:
        self.base += nbytes
        self.bar(self.base, self.total)

    def close(self) -> None:
        self.bar.close()
