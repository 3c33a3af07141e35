"""The f32 working precision of the robust merges (issue 12): every method against the float64
reference of its definition applied to the f32 points, the same bits for any thread count and
block size, the same masks as the f64 mode's definition, both executors, and how it is asked for
(API, CLI, TOML) and recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.commands import mecha as mc
from astolfomix_rs.errors import RecipeError
from test_dropout import CASES as DROP_CASES
from test_dropout import expected as drop_expected
from test_robust import REFS, make_pool, recipe, rel_l2

# f32 points and sums against an f64 reference: errors of f32 rounding, measured against the
# scale of the inputs (|base| + the largest |delta|; a merged delta may be ~0 where the inputs are
# not). Deltas here are 5% of the base, so a wrong step is off by ~5e-2 on this scale.
TOL = 1e-6


def err_vs_scale(got, expect, b, deltas):
    """|got - expect| over the inputs' scale (all finite positions)."""
    scale = np.abs(b) + np.max(np.abs(np.stack(deltas)), axis=0) if deltas else np.abs(b)
    fin = np.isfinite(expect) & np.isfinite(scale)
    den = np.linalg.norm(scale[fin])
    return np.linalg.norm(got[fin] - expect[fin]) / den if den else np.linalg.norm(got[fin] - expect[fin])


def f32_deltas(models, b32, key):
    """The points as the f32 mode computes them: m - b rounded to f32, then exact in f64."""
    return [(m.tensor(key).astype(np.float32) - b32).astype(np.float64) for m in models]


def run(folder, text, out, precision="f32", dtype="f32", **kw):
    plan, summary = mc.mecha_plan(mc.parse_mecha(text), folder, dtype=dtype, precision=precision)
    am.execute(plan, folder / out, progress=False, overwrite=True, **kw)
    return am.Checkpoint(folder / out), summary


def check(folder, files, text, fn, out="o.safetensors"):
    got_ck, _ = run(folder, text, out)
    base = am.Checkpoint(folder / "base.safetensors")
    models = [am.Checkpoint(folder / f) for f in files]
    for key in base.keys():
        if key == "ids":
            assert got_ck.tensor(key).tolist() == base.tensor(key).tolist()
            continue
        b32 = base.tensor(key).astype(np.float32)
        b = b32.astype(np.float64)
        deltas = f32_deltas(models, b32, key)
        expect = b + fn(deltas, key)
        got = got_ck.tensor(key).astype(np.float64)
        assert np.array_equal(np.isfinite(got), np.isfinite(expect)), key
        err = err_vs_scale(got, expect, b, deltas)
        assert err <= TOL, (key, err)


@pytest.fixture(scope="module", params=[2, 17])
def pool(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"ppool{request.param}")
    return d, make_pool(d, request.param, seed=40 + request.param)


@pytest.mark.parametrize("method,params", list(REFS), ids=[f"{m}-{dict(p)}" for m, p in REFS])
def test_every_method_in_f32_matches_the_float64_reference(pool, method, params):
    d, files = pool
    check(d, files, recipe(files, method, **dict(params)), lambda deltas, key: REFS[(method, params)](deltas))


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_dropout_methods_in_f32_match_the_reference_with_the_same_masks(pool, case):
    """The masks are a function of the f32 points (their ranks), drawn by the same generator."""
    d, files = pool
    params = DROP_CASES[case]
    check(d, files, recipe(files, "ties_sum_with_dropout", **params), lambda deltas, key: drop_expected(deltas, key, params))


def test_f32_is_not_f64(tmp_path):
    """The precision is really used: f32 and f64 outputs (written as f64) differ by f32 rounding."""
    files = make_pool(tmp_path, 5, seed=3)
    text = recipe(files, "ties_sum_extended", k=0.5, apply_median=True, maxiter=3)
    a, _ = run(tmp_path, text, "a.safetensors", precision="f32", dtype="f64")
    b, _ = run(tmp_path, text, "b.safetensors", precision="f64", dtype="f64")
    x, y = a.tensor("mat"), b.tensor("mat")
    assert not np.array_equal(x, y)
    assert rel_l2(x, y) <= 1e-6


@pytest.mark.parametrize("method,params", [
    ("ties_sum_extended", dict(k=0.5, apply_median=True, maxiter=4)),
    ("ties_sum_with_dropout", dict(probability=0.3, della_eps=-0.2, k=0.7, vote_sgn=True, apply_median=True,
                                   maxiter=4, seed=9)),
    ("model_stock", {}),
])
def test_f32_same_bits_for_threads_and_chunks(tmp_path, method, params):
    files = make_pool(tmp_path, 9, seed=5)
    text = recipe(files, method, **params)
    outs = []
    for threads, chunk in ((1, 64), (2, 1 << 20), (7, 1000)):
        _, _ = run(tmp_path, text, f"o{threads}.safetensors", threads=threads, chunk=chunk)
        outs.append((tmp_path / f"o{threads}.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_f32_portable_loops_give_the_same_bits_as_the_vector_ones(tmp_path):
    files = make_pool(tmp_path, 5, seed=12)
    (tmp_path / "r.mecha").write_text(recipe(files, "ties_sum_extended", k=0.5, apply_median=True, maxiter=5))
    code = ("import sys, astolfomix_rs as am\nfrom astolfomix_rs.commands import mecha as mc\n"
            "plan, _ = mc.mecha_plan(mc.load_mecha(sys.argv[1]), sys.argv[2], dtype='f32', precision='f32')\n"
            "am.execute(plan, sys.argv[3], progress=False)\n")
    outs = []
    for kernel in ("scalar", ""):
        out = tmp_path / f"o-{kernel or 'best'}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.mecha"), str(tmp_path), str(out)],
                       env={**os.environ, "ASTOLFOMIX_KERNEL": kernel}, check=True, timeout=120)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method,params", [
    ("ties_sum_extended", dict(k=0.5, vote_sgn=True, apply_median=True, maxiter=3)),
    ("ties_sum_extended", dict(k=1.0)),
    ("model_stock", dict(whole=True)),
    ("ties_sum_with_dropout", dict(probability=0.1, della_eps=-0.1, k=1.0, vote_sgn=True, apply_median=True,
                                   maxiter=3, rescale=False, seed=2)),
])
def test_torch_path_in_f32_agrees_with_the_engine(tmp_path, method, params):
    pytest.importorskip("torch")
    files = make_pool(tmp_path, 5, seed=4)
    text = recipe(files, method, **params)
    a, _ = run(tmp_path, text, "cpu.safetensors")
    t, _ = run(tmp_path, text, "torch.safetensors", device="torch-cpu")
    base = am.Checkpoint(tmp_path / "base.safetensors")
    for k in a.keys():
        x, y = a.tensor(k), t.tensor(k)
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if k == "ids":
            assert np.array_equal(x, y)
            continue
        assert np.array_equal(np.isfinite(x), np.isfinite(y)), k
        b = base.tensor(k).astype(np.float64)
        assert err_vs_scale(x.astype(np.float64), y.astype(np.float64), b, [x - b]) <= TOL, k


def test_precision_is_asked_for_and_recorded(tmp_path, capsys):
    from astolfomix_rs.cli import main

    files = make_pool(tmp_path, 3, seed=6)
    (tmp_path / "r.mecha").write_text(recipe(files, "ties_sum_extended", k=1.0, apply_median=True))
    assert main(["merge", str(tmp_path / "r.mecha"), "--models", str(tmp_path), "--precision", "f32",
                 "-o", str(tmp_path / "cli.safetensors"), "--dry-run"]) == 0
    assert "precision f32" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "r.mecha"), "--models", str(tmp_path), "--precision", "f32",
                 "-o", str(tmp_path / "cli.safetensors")]) == 0
    meta = json.loads(am.Checkpoint(tmp_path / "cli.safetensors").metadata["astolfomix.robust"])
    assert meta["precision"] == "f32"
    # the default is f64, and the API's output is the CLI's
    _, s = run(tmp_path, recipe(files, "ties_sum_extended", k=1.0, apply_median=True), "api.safetensors",
               dtype="f16")
    assert s["precision"] == "f32"
    api, cli = am.Checkpoint(tmp_path / "api.safetensors"), am.Checkpoint(tmp_path / "cli.safetensors")
    assert all(api.raw(k).tobytes() == cli.raw(k).tobytes() for k in cli.keys())
    plan, s = mc.mecha_plan(mc.load_mecha(tmp_path / "r.mecha"), tmp_path)
    assert s["precision"] == "f64" and plan.precision == "f64"
    # TOML: a precision key; the argument overrides it
    toml = ('[robust]\nbase = "base.safetensors"\nmodels = [' + ", ".join(f'"{f}"' for f in files) + "]\n"
            'method = "ties_sum_extended"\nparams = { k = 1.0, apply_median = true }\nprecision = "f32"\n')
    (tmp_path / "r.toml").write_text(toml)
    assert mc.mecha_plan(mc.load_mecha(tmp_path / "r.toml"), tmp_path)[1]["precision"] == "f32"
    assert mc.mecha_plan(mc.load_mecha(tmp_path / "r.toml"), tmp_path, precision="f64")[1]["precision"] == "f64"
    (tmp_path / "bad.toml").write_text(toml.replace('"f32"', '"f16"'))
    with pytest.raises(RecipeError, match="robust.precision"):
        mc.load_mecha(tmp_path / "bad.toml")
    with pytest.raises(RecipeError, match="precision must be"):
        mc.mecha_plan(mc.load_mecha(tmp_path / "r.mecha"), tmp_path, precision="bf16")
    # a grid recipe has no use for it
    (tmp_path / "grid.txt").write_text("main: 01,02\n")
    assert main(["merge", str(tmp_path / "grid.txt"), "--models", str(tmp_path), "--precision", "f32"]) != 0
    assert "--precision is for robust recipes" in capsys.readouterr().err

