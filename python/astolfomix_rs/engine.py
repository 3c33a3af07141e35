"""Runs a plan: on the CPU through the Rust engine, or on CUDA through the torch path. Both
write through the Rust streaming writer, so the output is atomic either way."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import _core
from .plan import Plan


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
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, leave=False, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(
    plan: Plan,
    output: str | os.PathLike[str],
    *,
    device: str = "cpu",
    threads: int | None = None,
    chunk: int | None = None,
    kernel: str | None = None,
    io: str = "pread",
    progress: bool | Callable[[int, int], None] = True,
    overwrite: bool = False,
    durable: bool = True,
    gpu_memory: int | None = None,
    in_place: int | None = None,
) -> Report:
    """Executes ``plan`` and writes ``output`` atomically. ``device`` is "cpu" (the Rust engine),
    "torch-cpu" (the torch executor on the CPU, for testing it), or "cuda"/"cuda:N". The engine
    reads inputs with ``io="pread"`` (default: chunks copied into per-thread buffers) or
    ``io="mmap"`` (straight from the map, paying page faults and the final unmap).
    ``in_place=i``: ``output`` is input ``i`` and is replaced atomically by the result."""
    output = Path(output)
    bar = ProgressBar(progress is True, output.name)
    cb = progress if callable(progress) else (bar if bar.bar is not None else None)
    try:
        if device == "cpu":
            t0 = time.perf_counter()
            layout = plan.resolve()
            r = _core.execute(
                layout, os.fspath(output), threads=threads, chunk=chunk, kernel=kernel, io=io,
                durable=durable, overwrite=overwrite, in_place=in_place, progress=cb,
            )
            r["seconds"] = time.perf_counter() - t0  # the whole job, resolution included
            return Report(**{**r, "output": Path(r["output"])}, device="cpu", notes=dict(plan.notes))
        from . import cuda  # torch is imported only there

        return cuda.execute(
            plan, output, device=device, overwrite=overwrite, in_place=in_place, durable=durable,
            progress=cb, gpu_memory=gpu_memory, chunk=chunk,
        )
    finally:
        bar.close()
