"""A merge author's pool (issue 10): hashes cached and shared with the webui's cache.json, one
progress bar on a terminal, ``pool init``/``pool list``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs import _core
from astolfomix_rs.cli import main
from astolfomix_rs.commands.hashcache import HashCache
from astolfomix_rs.commands.hashing import file_hashes, pool_hashes
from astolfomix_rs.core.save import save
from astolfomix_rs.tools.synth import make_checkpoint


def _pool(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    return [make_checkpoint(folder / f"model{i}.safetensors", "sdxl", factor=32, seed=i) for i in range(n)]


def test_a_second_hash_comes_from_the_cache_and_a_changed_file_is_hashed_again(tmp_path, monkeypatch, capsys):
    files = _pool(tmp_path / "p")
    assert main(["hash", "--json", *map(str, files)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first[0]["sha256"] == file_hashes(files[0])["sha256"]

    def no_reading(*a, **k):
        raise AssertionError("read a file the cache knows")

    monkeypatch.setattr(_core, "file_hashes", no_reading)
    monkeypatch.setattr(_core, "content_hashes", no_reading)
    monkeypatch.setattr(_core, "sigmoid_sums", no_reading)
    assert main(["hash", "--json", *map(str, files)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["inspect", "--json", str(files[0])]) == 0  # header-only, content hashes from the cache
    info = json.loads(capsys.readouterr().out)[0]
    assert info["component_hashes"] == first[0]["components"] and info["toolkit"]["metric"] == first[0]["toolkit"]
    monkeypatch.undo()
    # Same size, new content and mtime: the entry no longer applies.
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 1
    files[1].write_bytes(bytes(data))
    os.utime(files[1], ns=(time.time_ns() + 10**9,) * 2)
    h = pool_hashes([files[1]], want=("file",), cache=HashCache(), progress=False)[0]
    assert h["sha256"] != first[1]["sha256"] and h["sha256"] == file_hashes(files[1])["sha256"]
    # --no-cache neither reads nor writes.
    assert main(["hash", "--no-cache", "--json", str(files[2])]) == 0
    assert json.loads(capsys.readouterr().out)[0]["sha256"] == first[2]["sha256"]


def test_hashes_flow_both_ways_through_a_webui_cache_json(tmp_path, monkeypatch):
    root = tmp_path / "models" / "Stable-diffusion"
    files = _pool(root / "xl", n=2)
    webui = tmp_path / "cache.json"
    real = file_hashes(files[0])["sha256"]
    # The webui knows file 0 (its layout, its title, an mtime not older than the file) ...
    webui.write_text(json.dumps({
        "hashes": {"checkpoint/xl/model0.safetensors": {"mtime": os.path.getmtime(files[0]) + 1, "sha256": real}},
        "safetensors-metadata": {"keep": {"x": 1}},
    }, indent=4))
    calls = []
    orig = _core.file_hashes
    monkeypatch.setattr(_core, "file_hashes", lambda cks, *a: calls.append(len(cks)) or orig(cks, *a))
    c = HashCache(enabled=False, webui=webui, webui_root=root)
    got = pool_hashes(files, want=("file",), cache=c, progress=False)
    # ... so only file 1's sha256 is computed; AutoV1/V3 of file 0 still need a read.
    assert got[0]["sha256"] == real and got[1]["sha256"] == file_hashes(files[1])["sha256"]
    d = json.loads(webui.read_text())
    assert d["safetensors-metadata"] == {"keep": {"x": 1}}  # the rest of the file is kept
    entry = d["hashes"]["checkpoint/xl/model1.safetensors"]
    assert entry["sha256"] == got[1]["sha256"] and entry["mtime"] == os.path.getmtime(files[1])
    # A stale webui entry (file newer than it) is not trusted.
    d["hashes"]["checkpoint/xl/model0.safetensors"] = {"mtime": 0.0, "sha256": "0" * 64}
    webui.write_text(json.dumps(d))
    got = pool_hashes(files[:1], want=("file",), cache=HashCache(enabled=False, webui=webui, webui_root=root),
                           progress=False)
    assert got[0]["sha256"] == real


WRITER = """
import sys
from astolfomix_rs.commands.hashcache import HashCache
c = HashCache(sys.argv[1])
for p in sys.argv[2:]:
    c.put(p, {"sha256": "x" * 64})
c.flush()
"""


def test_concurrent_runs_merge_their_entries(tmp_path):
    files = []
    for i in range(40):
        p = tmp_path / f"{i}.safetensors"
        save(p, {"w": np.full(2, i, np.float32)}, durable=False)
        files.append(str(p))
    cache = tmp_path / "c" / "hashes.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache), *files[k::4]]) for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    c = HashCache(cache)
    assert all(c.get(f).get("sha256") == "x" * 64 for f in files)


PTY = """
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    import fcntl, struct, termios
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    os.execv(sys.executable, [sys.executable, "-m", "astolfomix_rs.cli", *sys.argv[1:]])
out = b""
while True:
    try:
        b = os.read(fd, 65536)
    except OSError:
        break
    if not b:
        break
    out += b
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("cmd", [["hash"], ["inspect", "--hashes"], ["compare"], ["inspect", "--nan"],
                                 ["compare", "--distance", "--no-cache"]])
def test_long_commands_show_a_byte_progress_bar_on_a_terminal_only(tmp_path, cmd):
    big = [make_checkpoint(tmp_path / f"b{i}.safetensors", "sdxl", factor=4, seed=i, fast=True) for i in range(2)]
    files = [str(b) for b in big][: 2 if cmd[0] == "compare" else 1]
    r = subprocess.run([sys.executable, "-c", PTY, *cmd, *files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout
    assert ("NaN/Inf scan" if "--nan" in cmd else "distances" if "--distance" in cmd else "hashing") in r.stdout
    assert "B/s" in r.stdout, r.stdout[-2000:]
    if "--hashes" in cmd:
        assert "content hash" in r.stdout and "toolkit metric" in r.stdout
    # In a pipe: no bar.
    r = subprocess.run([sys.executable, "-m", "astolfomix_rs.cli", *cmd, "--no-cache", *files], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "B/s" not in r.stdout + r.stderr


def test_content_hashes_and_metric_match_the_numpy_definitions(tmp_path):
    """The streamed canonical form and the table-driven metric against float64 numpy."""
    import hashlib

    from astolfomix_rs.commands.components import toolkit_metric
    from astolfomix_rs.models.anatomy import detect

    rng = np.random.default_rng(5)
    vals = {"a": (rng.standard_normal((300, 70)) * 3).astype(np.float16),
            "b": rng.standard_normal(200_000).astype(np.float32),
            "c": rng.standard_normal(1000).astype(np.float64)}
    p = tmp_path / "m.safetensors"
    save(p, vals)
    ck = am.Checkpoint(p)
    entries = [(k, k) for k in vals]
    want = hashlib.sha256()
    for k in sorted(vals):
        h = hashlib.sha256()
        h.update(k.encode() + b"\0" + f"{list(vals[k].shape)}float".encode() + b"\0")
        h.update(vals[k].astype(np.float32).astype("<f4").tobytes())
        want.update(h.digest())
    assert _core.content_hashes(ck._core, {"g": entries})["g"] == want.hexdigest()
    sums = _core.sigmoid_sums(ck._core, list(vals))
    for k, s in zip(vals, sums):
        h = vals[k].astype(np.float16).astype(np.float64)
        exact = float((1 / (1 + np.exp(-h)) - 0.5).sum())
        # Each term is computed in f32 as the toolkit does: within an f32 ulp of 0.5 per element.
        assert abs(s - exact) <= h.size * 6e-8, (k, s, exact)
    assert detect(ck) is not None and toolkit_metric(ck, detect(ck))["metric"] == "----/----/----"


def test_pool_init_numbers_forty_downloads_and_a_grid_recipe_merges_over_them(tmp_path, capsys):
    from astolfomix_rs.commands import recipe as rc
    from astolfomix_rs.core.engine import execute

    folder = tmp_path / "downloads"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{w}{i}_v{rng.integers(1, 9)}" for i, w in enumerate(["pony", "Animagine", "kohaku", "zeta", "Ærø"] * 8)]
    for i, n in enumerate(names):
        make_checkpoint(folder / f"{n}.safetensors", "sd1", factor=32, seed=i)
    assert main(["pool", "init", str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert len(rows) == 40 and [r["id"] for r in rows] == [f"{i:02d}" for i in range(1, 41)]
    order = sorted((f"{n}.safetensors" for n in names), key=lambda s: (s.casefold(), s))
    assert [r["file"] for r in rows] == order  # stable: by name
    assert sorted(os.listdir(folder)) == sorted([f"{n}.safetensors" for n in names] + ["astolfomix-pool.toml"])
    # A grid recipe over the ids: the UNET mean of models 03, 17 and 40, te of 05.
    recipe = rc.parse_grid("unet: 03,--,17,40=3\nte: 05\nmain=out.safetensors\n")
    plan, summary = rc.merge_plan(recipe, folder, output="main")
    assert [os.path.basename(f) for f in summary["components"]["unet"]] == [order[2], order[16], order[39]]
    execute(plan, tmp_path / "out.safetensors", progress=False)
    out, cks = am.Checkpoint(tmp_path / "out.safetensors"), [am.Checkpoint(folder / order[i]) for i in (2, 16, 39)]
    k = next(k for k in out.keys() if k.startswith("model.diffusion_model.") and out.info[k].is_float)
    want = np.mean([c.tensor(k).astype(np.float64) for c in cks], axis=0)
    np.testing.assert_allclose(out.tensor(k).astype(np.float64), want, rtol=1e-3, atol=1e-4)
    # Exclusion lists see the table's models too.
    assert len(rc.parse_grid("unet: 01,02=-2\n").selections["unet"].selected(rc.scan_pool(folder))) == 38
    # New downloads: old numbers stay, new ones follow; --rename names them _xNN-.
    make_checkpoint(folder / "aaa_new.safetensors", "sd1", factor=32, seed=99)
    assert main(["pool", "init", str(folder), "--rename", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["models"]
    assert {r["id"]: r["file"] for r in again if r["action"] == "kept"} == {r["id"]: r["file"] for r in rows}
    assert [r for r in again if r["action"] == "renamed"] == [{"id": "41", "file": "_x41-aaa_new.safetensors",
                                                              "action": "renamed"}]
    assert (folder / "_x41-aaa_new.safetensors").exists() and not (folder / "aaa_new.safetensors").exists()
    assert main(["pool", "list", "--hash", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.count("sd1") == 41 and "not hashed" not in text


def test_clean_forgets_cache_entries_of_files_that_are_gone(tmp_path, capsys):
    files = _pool(tmp_path / "p")
    assert main(["hash", "--json", *map(str, files)]) == 0
    capsys.readouterr()
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes() + b"")  # same bytes, new mtime: the entry no longer applies
    os.utime(files[1], ns=(time.time_ns() + 10**9,) * 2)
    assert main(["clean", "--cache-entries", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_entries_forgotten"] == 2
    c = HashCache()
    assert "sha256" in c.get(files[2]) and c.get(files[1]) == {}
