"""The pool as a whole: hashes of many files at once (from the hash cache where it knows them,
else computed behind one byte-progress bar and cached), and ``compare``: which files share
identical components, and how far each is from a reference or the mean."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import _core
from ..core.reader import Checkpoint
from ..core.report import Meter
from ..core.save import save_text
from ..errors import ArchitectureError, RecipeError
from ..models.anatomy import detect
from ..models.registry import model_id
from .hashcache import HashCache
from .hashing import pool_hashes
from .recipe import _INTER_FILE, _POOL, POOL_TABLE, ModelId, _inside, pool_table, scan_pool


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
    work = 0
    if distances:  # bytes the distance passes read: one bar for all components
        for n, idxs in comps.items():
            if len(idxs) > 1:
                work += sum(cks[i].info[k].nbytes for i in idxs for k in ans[i].components[n].keys
                            if k in cks[i].info and cks[i].info[k].is_float)
    meter = Meter(work, "distances", enabled=progress and bool(work))
    try:
        _groups_and_distances(comps, cks, ans, content, distances, reference, meter, result)
    finally:
        meter.close()
    return {"files": [os.fspath(c.path) for c in cks], "components": result}


def _groups_and_distances(comps, cks, ans, content, distances, reference, meter, result) -> None:
    for n, idxs in comps.items():
        hashes = {}
        for i in idxs:
            hashes[i] = content[i][n]
        groups: dict[str, list[int]] = {}
        for i, h in hashes.items():
            groups.setdefault(h, []).append(i)
        entry: dict[str, Any] = {
            "groups": [{"hash": h[:16], "files": [os.fspath(cks[i].path) for i in g]} for h, g in
                       sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))],
            "missing_from": [os.fspath(cks[i].path) for i in range(len(cks)) if i not in idxs],
        }
        if distances and len(idxs) > 1:
            keys = [k for k in ans[idxs[0]].components[n].keys if cks[idxs[0]].info[k].is_float]
            ref = None if reference is None else (idxs.index(reference) if reference in idxs else None)
            d = _core.l2_distances([cks[i]._core for i in idxs], keys, ref, meter.part())
            meter.advance(sum(cks[i].info[k].nbytes for i in idxs for k in keys))
            entry["relative_l2"] = {os.fspath(cks[i].path): (float(np.sqrt(a / b)) if b else 0.0) for i, (a, b) in zip(idxs, d)}
            entry["relative_to"] = "mean" if ref is None else os.fspath(cks[reference].path)
        result[n] = entry


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


# ---------------------------------------------------------------------------------------------
# pool init / pool list


def _models_in(folder: Path) -> list[Path]:
    """The checkpoints of a folder: visible ``.safetensors`` regular files (links that stay inside)."""
    out = []
    for p in sorted(folder.iterdir(), key=lambda p: (p.name.casefold(), p.name)):
        if p.name.startswith(".") or p.suffix.lower() != ".safetensors":
            continue
        if p.is_symlink():
            _inside(folder, p, f"pool file '{p.name}'")
        if p.is_file():
            out.append(p)
    return out


def init_pool(folder: str | os.PathLike[str], *, rename: bool = False, dry_run: bool = False) -> list[dict[str, str]]:
    """Numbers the models of ``folder`` into the ``_xNN-`` convention, in a stable order (by
    name), keeping every number already given (``_xNN-`` names, ``xNNa-`` intermediates and the
    folder's ``astolfomix-pool.toml``). New files get the next free numbers: with ``rename`` they
    are renamed ``_xNN-NAME``, otherwise the table records them and no file is touched.
    Returns ``[{"id", "file", "action"}]`` ("kept", "renamed" or "added")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecipeError(f"models folder {folder} does not exist")
    table = pool_table(folder)
    rows: list[dict[str, str]] = []
    taken: set[int] = set()
    in_table = set(table.values())
    for k, name in table.items():
        taken.add(ModelId.parse(k).number)
        rows.append({"id": str(ModelId.parse(k)), "file": name, "action": "kept"})
    new = []
    for p in _models_in(folder):
        m, mi = _POOL.match(p.name), _INTER_FILE.match(p.name)
        if m:
            taken.add(int(m.group(1)))
            rows.append({"id": str(ModelId(int(m.group(1)))), "file": p.name, "action": "kept"})
        elif mi:
            rows.append({"id": str(ModelId(int(mi.group(1)), mi.group(2).lower())), "file": p.name, "action": "kept"})
        elif p.name not in in_table:
            new.append(p)
    nxt = max(taken, default=0) + 1
    width = 3 if nxt + len(new) > 100 else 2
    added: dict[str, str] = {}
    for p in new:
        mid = f"{nxt:0{width}d}"
        nxt += 1
        if rename:
            target = p.with_name(f"_x{mid}-{p.name}")
            if not dry_run:
                try:
                    os.link(p, target)  # fails if the name is taken: never replaces a file
                    os.unlink(p)
                except FileExistsError:
                    raise RecipeError(f"{target}: already exists; not renamed") from None
                except OSError:
                    if target.exists():
                        raise RecipeError(f"{target}: already exists; not renamed") from None
                    os.rename(p, target)  # a file system without hard links
            rows.append({"id": mid, "file": target.name, "action": "renamed"})
        else:
            added[mid] = p.name
            rows.append({"id": mid, "file": p.name, "action": "added"})
    if added and not dry_run:
        merged = {**table, **added}
        lines = ["# Written by `astolfomix pool init`: model ids of files in this folder that keep their names.",
                 "# Grid recipes over this folder use these ids like _xNN- names; edit freely.", "[models]"]
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in
                  sorted(merged.items(), key=lambda kv: (ModelId.parse(kv[0]).number, kv[0]))]
        save_text(folder / POOL_TABLE, "\n".join(lines) + "\n", overwrite=True)
    return sorted(rows, key=lambda r: (ModelId.parse(r["id"]).number, ModelId.parse(r["id"]).suffix))


def list_pool(folder: str | os.PathLike[str], *, cache: HashCache | None = None, compute: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Each model of the folder by id: architecture, size, dtype, AutoV2 (from the hash cache, or
    computed with ``compute``), and which files share a text encoder (from cached content hashes)."""
    folder = Path(folder)
    pool = scan_pool(folder)
    ids = sorted(pool, key=lambda m: (m.number, m.suffix))
    paths = [pool[m][0] for m in ids]
    cache = cache or HashCache()
    known = (pool_hashes(paths, want=("file", "content"), cache=cache, progress=progress) if compute
             else [cache.get(p) for p in paths])
    models = []
    for m, p, k in zip(ids, paths, known):
        ck = Checkpoint(p)
        an = detect(ck)
        dts: dict[str, int] = {}
        for t in ck.info.values():
            if t.is_float:
                dts[t.dtype] = dts.get(t.dtype, 0) + t.nbytes
        models.append({"id": str(m), "file": p.name, "arch": an.arch, "size": ck.file_len,
                       "dtype": max(dts, key=lambda d: dts[d]) if dts else "-",
                       "autov2": k["sha256"][:10] if "sha256" in k else None,
                       "components": k.get("components", {}), "duplicates": len(pool[m]) - 1})
    shared: dict[str, list[list[str]]] = {}
    for comp in ("te0", "te1", "te", "vae", "unet"):
        groups: dict[str, list[str]] = {}
        for row in models:
            h = row["components"].get(comp)
            if h:
                groups.setdefault(h, []).append(row["id"])
        same = [g for g in groups.values() if len(g) > 1]
        if same:
            shared[comp] = same
    return {"folder": str(folder), "models": models, "identical": shared,
            "hashed": sum(1 for r in models if r["components"]), "count": len(models)}
