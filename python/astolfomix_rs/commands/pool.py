"""The pool as a whole: hashes of many files at once (from the hash cache where it knows them,
else computed behind one byte-progress bar and cached), and ``compare``: which files share
identical components, and how far each is from a reference or the mean."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import _core
from ..core.reader import Checkpoint
from ..core.report import Meter
from ..errors import ArchitectureError
from ..models.anatomy import detect
from ..models.registry import model_id
from .components import component_hashes, toolkit_metric
from .hashcache import HashCache
from .hashing import FILE_KEYS, files_hashes


def pool_hashes(paths: Sequence[str | os.PathLike[str]], *, want: Iterable[str] = ("file", "content", "toolkit"),
                cache: HashCache | None = None, progress: bool = True,
                opened: dict[int, Checkpoint] | None = None) -> list[dict[str, Any]]:
    """For each path, what ``want`` names: ``file`` (sha256, autov1/2/3), ``content``
    (``components``: content hash per component) and ``toolkit`` (``toolkit``: the metric dict).
    Cached values are used when the file is unchanged; the rest is computed (file hashes of all
    files in one parallel pass) and cached. ``opened``: handles the caller already holds, by
    index, so no file is opened twice."""
    from ..models.anatomy import detect

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


def compare(paths: Sequence[str | os.PathLike[str]], *, distances: bool = False, reference: int | None = None,
            cache=None, progress: bool = False) -> dict:
    """Per component: groups of files whose content is identical, and (on request) the relative L2
    distance of each file's component to a reference file or to the mean."""
    cks = [Checkpoint(p) for p in paths]
    ans = [detect(c) for c in cks]
    content = [h["components"] for h in pool_hashes(paths, want=("content",), cache=cache, progress=progress,
                                                     opened=dict(enumerate(cks)))]
    comps: dict[str, list[int]] = {}
    for i, a in enumerate(ans):
        for n in a.components:
            comps.setdefault(n, []).append(i)
    result: dict[str, dict] = {}
    for n, idxs in comps.items():
        hashes = {}
        for i in idxs:
            hashes[i] = content[i][n]
        groups: dict[str, list[int]] = {}
        for i, h in hashes.items():
            groups.setdefault(h, []).append(i)
        entry = {
            "groups": [{"hash": h[:16], "files": [os.fspath(cks[i].path) for i in g]} for h, g in
                       sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))],
            "missing_from": [os.fspath(cks[i].path) for i in range(len(cks)) if i not in idxs],
        }
        if distances and len(idxs) > 1:
            keys = [k for k in ans[idxs[0]].components[n].keys if cks[idxs[0]].info[k].is_float]
            ref = None if reference is None else (idxs.index(reference) if reference in idxs else None)
            d = _core.l2_distances([cks[i]._core for i in idxs], keys, ref)
            entry["relative_l2"] = {os.fspath(cks[i].path): (float(np.sqrt(a / b)) if b else 0.0) for i, (a, b) in zip(idxs, d)}
            entry["relative_to"] = "mean" if ref is None else os.fspath(cks[reference].path)
        result[n] = entry
    return {"files": [os.fspath(c.path) for c in cks], "components": result}


def selection_line(result: dict, component: str, same_as: str) -> str:
    """A recipe line selecting the models whose ``component`` equals that of file ``same_as``."""
    comp = result["components"].get(component)
    if comp is None:
        raise ArchitectureError(f"no file has a {component} component")
    group = next((g["files"] for g in comp["groups"] if same_as in g["files"] or
                  any(Path(f).name == Path(same_as).name for f in g["files"])), None)
    if group is None:
        raise ArchitectureError(f"{same_as} is not among the compared files")
    ids = [model_id(f) for f in group]
    ids = [i for i in ids if i is not None]
    if not ids:
        raise ArchitectureError("none of those files is named _xNN-... ; cannot write a recipe line")
    ids.sort()
    return f"{component}: {','.join(ids)}={len(ids)}"
