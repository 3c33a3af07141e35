"""One exception hierarchy. Every message names the file and, where there is one, the tensor."""

from __future__ import annotations


class AstolfomixError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidFileError(AstolfomixError, ValueError):
    """A file is not a valid safetensors checkpoint (truncated, bad header, pickle, directory...)."""


class InputNotFoundError(AstolfomixError, FileNotFoundError):
    """An input file does not exist."""


class MismatchError(AstolfomixError, ValueError):
    """Inputs disagree about a tensor (shape, dtype kind) or a key is missing with strict=True."""


class PlanError(AstolfomixError, ValueError):
    """A plan or its arguments cannot be executed (no inputs, bad weights, bad dtype...)."""


class OutputError(AstolfomixError, OSError):
    """The output cannot be written where asked (exists, is an input, folder missing)."""


class AstolfomixIOError(AstolfomixError, OSError):
    """An operating-system error while reading or writing."""


class DiskFullError(AstolfomixIOError):
    """The disk (or quota, or file-size limit) ran out while writing; nothing was left behind."""


class RecipeError(AstolfomixError, ValueError):
    """A recipe cannot be parsed or resolved."""


class ArchitectureError(AstolfomixError, ValueError):
    """A component or architecture is missing or does not fit where it is asked to go."""


class DeviceError(AstolfomixError, RuntimeError):
    """The requested device cannot be used (no torch, no CUDA)."""


# Raised by the Rust side under these names (see rust/error.rs `Error::kind`).
Cancelled = KeyboardInterrupt

__all__ = [
    "AstolfomixError",
    "InvalidFileError",
    "InputNotFoundError",
    "MismatchError",
    "PlanError",
    "OutputError",
    "AstolfomixIOError",
    "DiskFullError",
    "RecipeError",
    "ArchitectureError",
    "DeviceError",
]
