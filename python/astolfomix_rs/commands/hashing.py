"""File hashes users know, computed in Rust (files in parallel, each read once):
AutoV1 (webui legacy), AutoV2 (sha256 of the file; 10 hex digits shown), AutoV3 (tensor data)."""

from __future__ import annotations

import os
from typing import Sequence

from .. import _core
from ..core.reader import Checkpoint

Openable = str | os.PathLike[str] | Checkpoint

FILE_KEYS = ("sha256", "autov1", "autov3")


def _handle(f: Openable) -> _core.Checkpoint:
    return f._core if isinstance(f, Checkpoint) else _core.Checkpoint(os.fspath(f))


def _shaped(h: dict[str, str]) -> dict[str, str]:
    return {"sha256": h["sha256"], "autov1": h["autov1"], "autov2": h["sha256"][:10], "autov3": h["autov3"]}


def files_hashes(files: Sequence[Openable], progress=None) -> list[dict[str, str]]:
    """For each file (a path, or a checkpoint already open): sha256, autov1 (8 hex), autov2 (10
    hex), autov3 (sha256 of the tensor data)."""
    return [_shaped(h) for h in _core.file_hashes([_handle(f) for f in files], progress)]


def file_hashes(file: Openable) -> dict[str, str]:
    return files_hashes([file])[0]
