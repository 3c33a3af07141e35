"""Reading checkpoints: a thin layer over the Rust reader. Tensors come back as numpy views of
the memory map (no copy) wherever numpy has the dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from .. import _core
from ..errors import MismatchError, PlanError

# safetensors dtype -> numpy dtype for zero-copy views.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
# The dtype table comes from the core, so both languages agree: (name, bits, averageable).
DTYPE_BITS: dict[str, int] = {name: bits for name, bits, _ in _core.dtypes()}
#: dtypes that can be averaged and converted (the float types the kernels read and write)
FLOAT_DTYPES: tuple[str, ...] = tuple(name for name, _, avg in _core.dtypes() if avg)
#: bytes per element of every byte-sized dtype (F4/F6 are packed and have none)
ITEMSIZE: dict[str, int] = {k: b // 8 for k, b in DTYPE_BITS.items() if b % 8 == 0}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _f8_table(exp_bits: int, man_bits: int, finite_only: bool) -> np.ndarray:
    bias = (1 << (exp_bits - 1)) - 1
    out = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & ((1 << exp_bits) - 1)
        m = b & ((1 << man_bits) - 1)
        top = e == (1 << exp_bits) - 1
        if top and not finite_only:
            out[b] = sign * np.inf if m == 0 else np.nan
        elif top and finite_only and m == (1 << man_bits) - 1:
            out[b] = np.nan
        elif e == 0:
            out[b] = sign * m * 2.0 ** (1 - bias - man_bits)
        else:
            out[b] = sign * (m + (1 << man_bits)) * 2.0 ** (e - bias - man_bits)
    return out


F8_TABLES = {"F8_E4M3": _f8_table(4, 3, True), "F8_E5M2": _f8_table(5, 2, False)}


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of a raw BF16 (uint16) or F8 (uint8) array."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in F8_TABLES:
        return F8_TABLES[dtype][raw]

    raise PlanError(f"{dtype} has a numpy dtype; no conversion needed")


class Checkpoint:
    """A validated safetensors file. Tensors are read with ``pread`` into fresh arrays, so a file
    truncated by another program while it is read raises an error naming it (never a SIGBUS).

    >>> ck = Checkpoint("model.safetensors")       # doctest: +SKIP
    >>> ck.tensor("first_stage_model.decoder.conv_in.bias")
    """

    def __init__(self, path: str | os.PathLike[str], *, core: _core.Checkpoint | None = None):
        """Opens ``path``, or wraps ``core``, a file the core has opened already."""
        self._core = core if core is not None else _core.Checkpoint(os.fspath(path))
        self.path = self._core.path
        self.file_len: int = self._core.file_len
        self.data_start: int = self._core.data_start
        self.info: dict[str, TensorInfo] = {
            n: TensorInfo(n, d, tuple(s), o, b) for (n, d, s, o, b) in self._core.tensors()
        }

    @cached_property
    def metadata(self) -> dict[str, str]:
        return dict(self._core.metadata)

    def keys(self) -> list[str]:
        return list(self.info)

    def __contains__(self, name: object) -> bool:
        return name in self.info

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor (uint8)."""
        t = self._get(name)
        out = np.empty(t.nbytes, dtype=np.uint8)
        self._core.read_into(t.offset, out)
        return out

    def tensor(self, name: str, *, raw: bool = False) -> np.ndarray:
        """One tensor as numpy, for every dtype numpy has; BF16 and F8 are converted to float32
        unless ``raw=True``, which returns their bits (uint16 / uint8). Packed F4/F6 and other
        F8 variants: bytes only."""
        t = self._get(name)
        if t.dtype in NUMPY_DTYPES:
            return self.raw(name).view(NUMPY_DTYPES[t.dtype]).reshape(t.shape)
        if t.dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
            bits = np.dtype("<u2") if t.dtype == "BF16" else np.dtype("<u1")
            arr = self.raw(name).view(bits).reshape(t.shape)
            return arr if raw else to_float32(arr, t.dtype)
        return self.raw(name)

    def _get(self, name: str) -> TensorInfo:
        try:
            return self.info[name]
        except KeyError:

            raise MismatchError(f"tensor '{name}': not found in {self.path}") from None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {self.file_len} bytes)"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens and validates a safetensors file."""
    return Checkpoint(path)
