"""Saving tensors from numpy (synthetic checkpoints) as a plan of constants, so they go through
the same engine and streaming writer as every other output."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import _core
from ..errors import AstolfomixIOError, DiskFullError, OutputError, PlanError
from .engine import execute
from .plan import Output, Plan

_NP_TO_ST = {
    np.dtype(np.bool_): "BOOL", np.dtype("u1"): "U8", np.dtype("i1"): "I8", np.dtype("i2"): "I16",
    np.dtype("u2"): "U16", np.dtype("i4"): "I32", np.dtype("u4"): "U32", np.dtype("i8"): "I64",
    np.dtype("u8"): "U64", np.dtype("f2"): "F16", np.dtype("f4"): "F32", np.dtype("f8"): "F64",
    np.dtype("c8"): "C64",
}

# A tensor to save: a numpy array, or (safetensors dtype, shape, raw bytes) for BF16/F8.
Tensor = np.ndarray | tuple[str, tuple[int, ...], np.ndarray]


def _entry(name: str, t: Tensor) -> tuple[str, tuple[int, ...], np.ndarray]:
    if isinstance(t, tuple):
        dtype, shape, raw = t
        return dtype, tuple(shape), np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    arr = np.asarray(t)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # not ascontiguousarray: it turns scalars into shape (1,)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dt not in _NP_TO_ST:
        raise PlanError(f"tensor '{name}': numpy dtype {arr.dtype} has no safetensors equivalent")
    return _NP_TO_ST[dt], arr.shape, arr.astype(dt, copy=False).reshape(-1).view(np.uint8)


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    durable: bool = True,
) -> None:
    """Saves ``tensors`` as a safetensors file, atomically: a plan of constants (the arrays are
    lent to the engine, not copied) run through the one writer."""

    outputs = [Output.constant(n, *_entry(n, t)) for n, t in tensors.items()]
    execute(Plan([], outputs, metadata=dict(metadata or {})), path, overwrite=overwrite, durable=durable,
            progress=False)


def save_text(path: str | os.PathLike[str], text: str, overwrite: bool) -> None:
    """Writes a small text file (a config, a table, a cache) whole or not at all: a temp file
    beside it, then a rename (or, without ``overwrite``, a link that fails if something appeared
    there meanwhile)."""
    path = Path(path)
    tmp = _core.temp_path(path)  # named like the writer's, so `clean_stale` knows it
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path}: already exists (pass overwrite=True / --overwrite)") from None
    except OSError as e:
        cls = DiskFullError if e.errno in (errno.ENOSPC, errno.EDQUOT) else AstolfomixIOError
        raise cls(f"{path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
