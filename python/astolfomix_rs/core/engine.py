"""Runs a plan: on the CPU through the Rust engine, or on CUDA through the torch path. Both
write through the Rust streaming writer, so the output is atomic either way."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .. import _core
from .plan import Plan
from .report import ProgressBar, Report  # noqa: F401  (Report is part of this module's API)


def execute(
    plan: Plan,
    output: str | os.PathLike[str],
    *,
    device: str = "cpu",
    threads: int | None = None,
    chunk: int | None = None,
    kernel: str | None = None,
    io: str = "auto",
    progress: bool | Callable[[int, int], None] = True,
    overwrite: bool = False,
    durable: bool = True,
    gpu_memory: int | None = None,
    in_place: int | None = None,
) -> Report:
    """Executes ``plan`` and writes ``output`` atomically. ``device`` is "cpu" (the Rust engine),
    "torch-cpu" (the torch executor on the CPU, for testing it), or "cuda"/"cuda:N". The engine
    reads inputs with ``io="pread"`` (chunks copied into per-thread buffers), ``io="mmap"``
    (straight from the map, paying page faults and the final unmap) or ``io="auto"`` (default:
    pread for tensors read once, the map for robust tensors, read in several passes).
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

        from . import cuda  # imports torch: only when a torch device is asked for

        return cuda.execute(
            plan, output, device=device, overwrite=overwrite, in_place=in_place, durable=durable,
            progress=cb, gpu_memory=gpu_memory, chunk=chunk,
        )
    finally:
        bar.close()
