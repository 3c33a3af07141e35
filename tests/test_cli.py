"""The astolfomix command: exit codes, --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import astolfomix_rs as am
import numpy as np
from astolfomix_rs.cli import main
from astolfomix_rs.core.save import save


def test_mean_json_and_weights(tmp_path, capsys):
    save(tmp_path / "a.safetensors", {"w": np.ones(4, np.float32), "only_a": np.ones(2, np.float32)})
    save(tmp_path / "b.safetensors", {"w": np.zeros(4, np.float32)})
    rc = main(["mean", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "o.safetensors"),
               "--weights", "3,1", "--dtype", "f32", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tensors"] == 2 and d["notes"]["missing"] == {"only_a": ["b.safetensors"]} and d["device"] == "cpu"
    np.testing.assert_array_equal(am.Checkpoint(tmp_path / "o.safetensors").tensor("w"), np.full(4, 0.75, np.float32))


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02}q\x00.")
    rc = main(["mean", str(tmp_path / "x.ckpt"), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("astolfomix mean: error:") and "pickle" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "astolfomix_rs.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and am.__version__ in r.stdout


def test_demo_json(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "pool"), "--factor", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    out = am.Checkpoint(d["output"])
    md = json.loads(out.metadata["astolfomix.merge"])
    assert md["counts"] == {"te0": 4, "te1": 4, "unet": 6}
    assert d["merge"]["tensors"] == 2527 and d["seconds"] < 60
