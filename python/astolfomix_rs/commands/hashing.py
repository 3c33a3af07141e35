"""File hashes users know, computed in Rust (files in parallel, each read once):
AutoV1 (webui legacy), AutoV2 (sha256 of the file; 10 hex digits shown), AutoV3 (tensor data);
and :func:`pool_hashes`, which adds component content hashes and the toolkit metric, takes what
the hash cache already knows, computes the rest behind one byte-progress bar, and caches it."""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from .. import _core
from ..core.reader import Checkpoint
from ..core.report import Meter
from ..models.anatomy import detect
from .components import component_hashes, toolkit_metric
from .hashcache import HashCache

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


def pool_hashes(paths: Sequence[str | os.PathLike[str]], *, want: Iterable[str] = ("file", "content", "toolkit"),
                cache: HashCache | None = None, progress: bool = True,
                opened: dict[int, Checkpoint] | None = None) -> list[dict[str, Any]]:
    """For each path, what ``want`` names: ``file`` (sha256, autov1/2/3), ``content``
    (``components``: content hash per component) and ``toolkit`` (``toolkit``: the metric dict).
    Cached values are used when the file is unchanged; the rest is computed (file hashes of all
    files in one parallel pass) and cached. ``opened``: handles the caller already holds, by
    index, so no file is opened twice."""

    want = set(want)
    cache = cache or HashCache(enabled=False)
    known = [cache.get(p) for p in paths]
    need_file = [i for i, k in enumerate(known) if "file" in want and not all(x in k for x in FILE_KEYS)]
    need_content = [i for i, k in enumerate(known) if "content" in want and "components" not in k]
    need_toolkit = [i for i, k in enumerate(known) if "toolkit" in want and "toolkit" not in k]
    opened = dict(opened or {})
    for i in sorted(set(need_file) | set(need_content) | set(need_toolkit)):
        if i not in opened:
            opened[i] = Checkpoint(paths[i])
    total = sum(opened[i].file_len for i in need_file)
    total += sum(opened[i].file_len - opened[i].data_start for i in set(need_content))
    meter = Meter(total, "hashing", enabled=progress and bool(total))
    try:
        if need_file:
            cks = [opened[i] for i in need_file]
            for i, h in zip(need_file, files_hashes(cks, meter.part())):
                known[i].update(h)
                cache.put(paths[i], {k: h[k] for k in FILE_KEYS})
            meter.advance(sum(c.file_len for c in cks))
        for i in sorted(set(need_content) | set(need_toolkit)):
            ck = opened[i]
            an = detect(ck)
            new: dict[str, Any] = {}
            if i in need_content:
                new["components"] = component_hashes(ck, an, meter.part())
                meter.advance(ck.file_len - ck.data_start)
            if i in need_toolkit:
                met = toolkit_metric(ck, an)
                new["toolkit"] = {"metric": met["metric"], "names": met["names"]}
            known[i].update(new)
            cache.put(paths[i], new)
    finally:
        meter.close()
        cache.flush()
    for k in known:
        if "sha256" in k:
            k["autov2"] = k["sha256"][:10]
    return known
