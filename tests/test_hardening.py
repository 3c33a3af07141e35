"""Hostile and unlucky inputs (issue 9, the parts done so far): only regular files are opened, a
FIFO never blocks, thread and chunk counts are bounded, and none of these leaves an output."""

from __future__ import annotations

import os
import subprocess
import sys

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.cli import main
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import AstolfomixError, PlanError


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "_x03-x.safetensors"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(AstolfomixError, match="not a regular file"):
            am.Checkpoint(path)
    # The CLI, in a child with a deadline: a blocking open would hang here.
    for cmd in (["inspect", str(fifo)], ["hash", str(fifo)]):
        r = subprocess.run([sys.executable, "-m", "astolfomix_rs.cli", *cmd], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "not a regular file" in r.stderr, (cmd, r.stderr)


@pytest.mark.parametrize("value", ["0", "-1", "10000", "abc"])
def test_bad_thread_counts_are_error_lines(tmp_path, capsys, value):
    save(tmp_path / "a.safetensors", {"w": np.ones(4, np.float32)})
    with pytest.raises(SystemExit) as ei:
        main(["mean", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--threads", value])
    assert ei.value.code == 2
    assert "--threads" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_api_bounds_threads_and_chunk_before_writing(tmp_path):
    save(tmp_path / "a.safetensors", {"w": np.ones(4, np.float32)})
    for kw in ({"threads": 5000}, {"chunk": 2**62}):
        with pytest.raises(PlanError):
            am.mean([tmp_path / "a.safetensors"], tmp_path / "o.safetensors", progress=False, **kw)
        assert not (tmp_path / "o.safetensors").exists()
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_links_out_of_the_models_folder_are_refused(tmp_path):
    from astolfomix_rs.commands import mecha as mc
    from astolfomix_rs.commands.recipe import scan_pool
    from astolfomix_rs.errors import RecipeError

    outside, pool = tmp_path / "elsewhere", tmp_path / "pool"
    outside.mkdir()
    pool.mkdir()
    save(outside / "secret.safetensors", {"w": np.ones(2, np.float32)})
    save(pool / "inside.safetensors", {"w": np.ones(2, np.float32)})
    (pool / "_x01-link.safetensors").symlink_to(outside / "secret.safetensors")
    (pool / "ok.safetensors").symlink_to(pool / "inside.safetensors")  # a link that stays inside is fine
    with pytest.raises(RecipeError, match="outside"):
        scan_pool(pool)
    (pool / "_x01-link.safetensors").unlink()
    (pool / "l.safetensors").symlink_to(outside / "secret.safetensors")
    for name, ok in (("l.safetensors", False), ("ok.safetensors", True)):
        text = f'version 0.1.0\nmodel "{name}" model_config="sdxl-sgm" merge_space="weight"\n'
        if ok:
            mc.mecha_plan(mc.parse_mecha(text), pool)
        else:
            with pytest.raises(RecipeError, match="link to"):
                mc.mecha_plan(mc.parse_mecha(text), pool)
    assert scan_pool(pool) == {}


def test_weights_that_would_overflow_are_refused(tmp_path, capsys):
    for i in range(3):
        save(tmp_path / f"{i}.safetensors", {"w": np.ones(4, np.float32)})
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    with pytest.raises(PlanError, match="overflow"):
        am.mean(files, tmp_path / "o.safetensors", weights=[1e300, -1e300, 1], progress=False)
    with pytest.raises(PlanError, match="overflow"):
        am.mean(files, tmp_path / "o.safetensors", weights=[1e7, 1, 1], normalize_weights=False, progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    am.mean(files, tmp_path / "o.safetensors", weights=[2, -1, 0.5], progress=False)  # extrapolation is fine
    for bad in ("abc", "1,nan"):
        with pytest.raises(SystemExit):
            main(["mean", *map(str, files), "-o", str(tmp_path / "p.safetensors"), "--weights", bad])
        assert "--weights" in capsys.readouterr().err


TERM = """
import os, signal, sys
import astolfomix_rs.cli as cli
orig, sent = cli.mean, []
def mean(*a, **k):
    def tick(done, total):
        if not sent:  # once the engine is under way, as `kill` or a closing terminal would
            sent.append(1)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return orig(*a, **{**k, "progress": tick, "threads": 1, "chunk": 64, "kernel": "scalar"})
cli.mean = mean
sys.exit(cli.main(["mean", *sys.argv[2:-1], "-o", sys.argv[-1], "--no-fsync"]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c_and_leave_nothing(tmp_path, sig):
    files = []
    for i in range(4):
        p = tmp_path / f"{i}.safetensors"
        save(p, {f"w{k}": np.full(2_000_000, i, np.float32) for k in range(8)}, durable=False)
        files.append(str(p))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", TERM, sig, *files, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "interrupted" in r.stderr, (r.returncode, r.stderr)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)


def test_transformers_export_keeps_an_existing_config_and_names_its_dtype(tmp_path):
    import json

    from astolfomix_rs.commands import components as tk
    from astolfomix_rs.errors import OutputError
    from astolfomix_rs.tools.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "sd.safetensors", "sd1", factor=32)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        tk.export(src, "te0", hf, layout="transformers")
    assert (hf / "config.json").read_text() == "mine" and not (hf / "model.safetensors").exists()
    tk.export(src, "te0", hf, layout="transformers", overwrite=True)
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float16"
    tk.export(src, "te0", tmp_path / "hf32", layout="transformers", dtype="f32")
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]
