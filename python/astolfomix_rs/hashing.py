"""File hashes users know, computed in Rust (files in parallel, each read once):
AutoV1 (webui legacy), AutoV2 (sha256 of the file; 10 hex digits shown), AutoV3 (tensor data)."""

from __future__ import annotations

import os
from typing import Sequence

from . import _core


def files_hashes(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, str]]:
    """For each file: sha256, autov1 (8 hex), autov2 (10 hex), autov3 (sha256 of the tensor data)."""
    out = []
    for h in _core.file_hashes([os.fspath(p) for p in paths]):
        out.append({"sha256": h["sha256"], "autov1": h["autov1"], "autov2": h["sha256"][:10], "autov3": h["autov3"]})
    return out


def file_hashes(path: str | os.PathLike[str]) -> dict[str, str]:
    return files_hashes([path])[0]
