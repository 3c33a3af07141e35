"""A persistent hash cache, so a pool is read once: file hashes (sha256 = AutoV2, AutoV1,
AutoV3), component content hashes and the toolkit metric, keyed by the file's real path and
checked against its size, mtime, inode and device (any change and the entry is ignored).

Where: ``--cache FILE``, else ``$ASTOLFOMIX_CACHE``, else ``$XDG_CACHE_HOME/astolfomix/hashes.json``
(``~/.cache/...``). Concurrent runs are safe: writers take an ``fcntl`` lock on ``FILE.lock``,
merge their entries into what is on disk, and replace the file atomically; readers never see a
half-written file.

The webui's ``cache.json`` (``--webui-cache FILE``) is read and written in its own layout:
``{"hashes": {"checkpoint/NAME": {"mtime": <float>, "sha256": "<hex>"}}}``, NAME being the path
relative to the webui's checkpoint folder (``--webui-root``; default: the file name), under the
same ``FILE.lock`` the webui's ``filelock`` takes. So hashes flow both ways."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..core.save import save_text

#: Bump when what an entry means changes (a new canonical form, a new metric): old entries are ignored.
VERSION = 1


def default_path() -> Path:
    env = os.environ.get("ASTOLFOMIX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astolfomix" / "hashes.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``PATH.lock`` (what the webui's ``filelock`` takes on unix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}  # missing, unreadable or damaged: start afresh (it is only a cache)


def _write_json(path: Path, data: dict, indent: int | None = None) -> None:
    save_text(path, json.dumps(data, indent=indent), overwrite=True)


def _files(path: Path) -> dict:
    """The entries of the cache file at ``path`` as they are on disk now."""
    files = _read_json(path).get("files")
    return dict(files) if isinstance(files, dict) else {}


def _identity(path: Path) -> tuple[str, dict[str, int]]:
    st = os.stat(path)
    return os.path.realpath(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "dev": st.st_dev}


def _valid(entry: Any, ident: dict[str, int]) -> bool:
    """Whether a cache entry describes the file as it is now (same version, size, mtime, inode)."""
    return isinstance(entry, dict) and entry.get("v") == VERSION and all(entry.get(k) == v for k, v in ident.items())


class HashCache:
    """Read once at start, written once at the end (``flush``), merged under the lock."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, enabled: bool = True,
                 webui: str | os.PathLike[str] | None = None, webui_root: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path else default_path()
        self.enabled = enabled
        self.webui = Path(webui) if webui else None
        self.webui_root = Path(webui_root) if webui_root else None
        self._entries: dict[str, dict] = _files(self.path) if enabled else {}
        self._dirty: dict[str, dict] = {}
        self._webui_hashes: dict[str, Any] = {}
        self._webui_dirty = False
        if self.webui is not None:
            hashes = _read_json(self.webui).get("hashes")
            self._webui_hashes = dict(hashes) if isinstance(hashes, dict) else {}

    def _title(self, path: Path) -> str:
        if self.webui_root is not None:
            with contextlib.suppress(ValueError):
                return "checkpoint/" + os.path.relpath(os.path.realpath(path), os.path.realpath(self.webui_root))
        return "checkpoint/" + path.name

    def get(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """What is known about the file as it is now (empty when nothing is)."""
        path = Path(path)
        key, ident = _identity(path)
        out: dict[str, Any] = {}
        e = self._entries.get(key)
        if _valid(e, ident):
            out.update(e.get("data", {}))
        w = self._webui_hashes.get(self._title(path))
        if "sha256" not in out and isinstance(w, dict) and isinstance(w.get("sha256"), str):
            # The webui's rule: valid unless the file is newer than the entry.
            if os.path.getmtime(path) <= float(w.get("mtime", 0)):
                out["sha256"] = w["sha256"].lower()
        return out

    def put(self, path: str | os.PathLike[str], data: dict[str, Any]) -> None:
        path = Path(path)
        key, ident = _identity(path)
        merged = {**self.get(path), **data}
        entry = {"v": VERSION, **ident, "data": merged}
        self._entries[key] = entry
        self._dirty[key] = entry
        if self.webui is not None and "sha256" in data:
            self._webui_hashes[self._title(path)] = {"mtime": os.path.getmtime(path), "sha256": data["sha256"]}
            self._webui_dirty = True

    def prune(self) -> int:
        """Forgets the entries of files that are gone or changed (under the lock); returns how many."""
        with _locked(self.path):
            files = _files(self.path)
            keep = {}
            for key, e in files.items():
                try:
                    _, ident = _identity(Path(key))
                except OSError:
                    continue
                if _valid(e, ident):
                    keep[key] = e
            _write_json(self.path, {"version": VERSION, "files": keep})
        self._entries = dict(keep)
        return len(files) - len(keep)

    def flush(self) -> None:
        """Merges this run's entries into the files on disk (under their locks)."""
        if self.enabled and self._dirty:
            with _locked(self.path):
                files = _files(self.path)
                files.update(self._dirty)
                _write_json(self.path, {"version": VERSION, "files": files})
            self._dirty = {}
        if self.webui is not None and self._webui_dirty:
            with _locked(self.webui):
                d = _read_json(self.webui)
                hashes = d.get("hashes") if isinstance(d.get("hashes"), dict) else {}
                for title, v in self._webui_hashes.items():
                    old = hashes.get(title)
                    if not isinstance(old, dict) or float(old.get("mtime", 0)) <= v["mtime"]:
                        hashes[title] = v
                d["hashes"] = hashes
                _write_json(self.webui, d, indent=4)
            self._webui_dirty = False
