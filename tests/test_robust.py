"""Robust merges: every method against the float64 numpy reference of its definition, for many N
and shapes, edge values, thread counts and chunk sizes; sd-mecha 1.1 as the peer; .mecha recipes
in both file forms with 100+ models; linear chains compiled to the plain mean."""

from __future__ import annotations

import math

import astolfomix_rs as am
import numpy as np
import pytest
import reference_robust as ref
from astolfomix_rs.commands import mecha as mc
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import RecipeError

SHAPES = {"scalar": (), "vec": (7,), "mat": (5, 6), "conv": (4, 3, 2, 2), "odd": (13, 11), "row1": (9, 1)}


def make_pool(folder, n, seed=0):
    """A base and n fine-tunes: per key small deltas, plus zero deltas, tied signs and a NaN."""
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    base["zero"] = rng.standard_normal((3, 4)).astype(np.float32)
    base["tied"] = np.zeros((2, 4), np.float32)
    base["nan"] = rng.standard_normal((3, 3)).astype(np.float32)
    base["ids"] = np.arange(4, dtype=np.int64)
    save(folder / "base.safetensors", base)
    files = []
    for i in range(n):
        m = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items() if k != "ids"}
        m["zero"] = base["zero"]
        m["tied"] = np.array([[1, -1, 2, -2], [0.5, -0.5, 0, 0]], np.float32) * (1 if i % 2 else -1)
        if i == n // 2:
            m["nan"] = m["nan"].copy()
            m["nan"][1, 1] = np.nan
        m["ids"] = base["ids"]
        save(folder / f"m{i:03d}.safetensors", m)
        files.append(f"m{i:03d}.safetensors")
    return files


def recipe(files, method, **params):
    lines = ["version 0.1.0", 'model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"']
    lines += [f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    n = len(files)
    lines += [f'merge "subtract" &{i + 1} &0' for i in range(n)]
    kw = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    lines.append(f'merge "{method}" ' + " ".join(f"&{n + 1 + i}" for i in range(n)) + (" " + kw if kw else ""))
    lines.append(f'merge "add_difference" &0 &{2 * n + 1} alpha=1.0')
    return "\n".join(lines) + "\n"


REFS = {
    ("ties_sum", ()): lambda d: ref.ties_sum(d),
    ("ties_sum", (("k", 0.5), ("vote_sgn", True))): lambda d: ref.ties_sum(d, 0.5, True),
    ("ties_sum_extended", (("k", 1.0),)): lambda d: ref.ties_stock(d, 1.0),
    # Weiszfeld with ftol=1e-20 stops where the objective stops changing in floating point, which
    # two correct implementations reach an iteration apart with weights still moving by ~1e-9
    # (the objective is flat at the optimum). Exactness is checked with a fixed number of steps;
    # the published defaults are checked below at the precision that stop allows.
    ("ties_sum_extended", (("k", 0.3), ("vote_sgn", True), ("apply_median", True), ("maxiter", 3))):
        lambda d: ref.ties_median(d, 0.3, True, maxiter=3),
    ("ties_sum_extended", (("apply_stock", True), ("k", 1.0))): lambda d: ref.ties_sum(d),
    ("geometric_median", (("maxiter", 3),)): lambda d: ref.geometric_median(d, maxiter=3),
    ("model_stock", ()): lambda d: ref.model_stock(d),
    ("model_stock", (("whole", True),)): lambda d: ref.model_stock(d, whole=True),
}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = np.linalg.norm(b)
    return np.linalg.norm(a - b) / den if den else np.linalg.norm(a - b)


@pytest.fixture(scope="module", params=[1, 2, 3, 17, 64])
def pool(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"pool{request.param}")
    return d, make_pool(d, request.param, seed=request.param)


@pytest.mark.parametrize("method,params", list(REFS), ids=[f"{m}-{dict(p)}" for m, p in REFS])
def test_every_method_matches_the_float64_reference(pool, tmp_path, method, params):
    d, files = pool
    plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **dict(params))), d, dtype="f64")
    am.execute(plan, tmp_path / "o.safetensors", progress=False)
    out = am.Checkpoint(tmp_path / "o.safetensors")
    base = am.Checkpoint(d / "base.safetensors")
    models = [am.Checkpoint(d / f) for f in files]
    for key in base.keys():
        if key == "ids":
            assert out.tensor(key).tolist() == base.tensor(key).tolist()
            continue
        b = base.tensor(key).astype(np.float64)
        deltas = [m.tensor(key).astype(np.float64) - b for m in models]
        expect = b + REFS[(method, params)](deltas)
        got = out.tensor(key)
        assert got.shape == b.shape, key
        fin = np.isfinite(expect)
        assert np.array_equal(np.isfinite(got), fin), key
        assert rel_l2(got[fin], expect[fin]) <= 1e-12, (key, rel_l2(got[fin], expect[fin]))


def test_threads_and_chunk_sizes_give_the_same_bits(tmp_path):
    files = make_pool(tmp_path, 9)
    outs = []
    for threads, chunk in ((1, 64), (2, 1 << 20), (7, 1000)):
        text = recipe(files, "ties_sum_extended", k=0.5, apply_median=True)
        plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f32")
        o = tmp_path / f"o{threads}.safetensors"
        am.execute(plan, o, threads=threads, chunk=chunk, progress=False)
        outs.append(o.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_large_tensor_spans_many_blocks(tmp_path):
    """A tensor of 300K elements (five blocks): the Gram matrix is summed over blocks."""
    rng = np.random.default_rng(3)
    b = rng.standard_normal((600, 500)).astype(np.float32)
    save(tmp_path / "base.safetensors", {"w": b})
    files = []
    for i in range(4):
        save(tmp_path / f"m{i}.safetensors", {"w": (b + 0.01 * rng.standard_normal(b.shape)).astype(np.float32)})
        files.append(f"m{i}.safetensors")
    for method, params, fn in (("geometric_median", {"maxiter": 3}, lambda d: ref.geometric_median(d, maxiter=3)),
                               ("ties_sum_extended", {"k": 0.7}, lambda d: ref.ties_stock(d, 0.7))):
        plan, s = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **params)), tmp_path, dtype="f64")
        am.execute(plan, tmp_path / "o.safetensors", progress=False, overwrite=True)
        got = am.Checkpoint(tmp_path / "o.safetensors").tensor("w")
        deltas = [am.Checkpoint(tmp_path / f).tensor("w").astype(np.float64) - b for f in files]
        assert rel_l2(got, b + fn(deltas)) <= 1e-12


def test_against_sd_mecha(tmp_path):
    """sd-mecha 1.1's own method functions on the same deltas (fp64), compared after fp32 rounding."""
    torch = pytest.importorskip("torch")
    ties = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.ties")
    files = make_pool(tmp_path, 5, seed=11)
    base = am.Checkpoint(tmp_path / "base.safetensors")
    models = [am.Checkpoint(tmp_path / f) for f in files]
    cases = [
        ("ties_sum", {"k": 1.0}, lambda ds: ties.ties_sum.__wrapped__(*ds, k=1.0)),
        ("ties_sum", {"k": 0.5, "vote_sgn": True}, lambda ds: ties.ties_sum.__wrapped__(*ds, k=0.5, vote_sgn=True)),
        ("ties_sum_extended", {"k": 1.0}, lambda ds: ties.ties_sum_extended.__wrapped__(*ds, k=1.0)),
        ("ties_sum_extended", {"k": 1.0, "vote_sgn": True, "apply_median": True},
         lambda ds: ties.ties_sum_extended.__wrapped__(*ds, k=1.0, vote_sgn=True, apply_median=True)),
        ("geometric_median", {}, lambda ds: ties.geometric_median.__wrapped__(*ds)),
        ("model_stock", {}, lambda ds: ties.model_stock.__wrapped__(*ds)),
    ]
    for method, params, peer in cases:
        plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **params)), tmp_path, dtype="f32")
        am.execute(plan, tmp_path / "o.safetensors", progress=False, overwrite=True)
        out = am.Checkpoint(tmp_path / "o.safetensors")
        for key in ("vec", "mat", "conv", "odd"):
            b = torch.from_numpy(base.tensor(key).astype(np.float64))
            ds = [torch.from_numpy(m.tensor(key).astype(np.float64)) - b for m in models]
            want = (b + peer(ds)).to(torch.float32).numpy()
            got = out.tensor(key)
            # within fp32 rounding of the result
            assert np.allclose(got, want, rtol=2e-7, atol=2e-7), (method, params, key, np.abs(got - want).max())


def test_weighted_sum_chain_is_the_plain_mean(tmp_path):
    files = make_pool(tmp_path, 101, seed=5)
    lines = ["version 0.1.0"] + [f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    prev = 0
    for i in range(1, 101):
        # acc_(i+1) = (1 - a) acc_i + a m_i with a = 1/(i+1): the running mean (as published chains,
        # which write weighted_sum(m_i, acc, alpha=i/(i+1)))
        lines.append(f'merge "weighted_sum" &{prev} &{i} alpha={1 / (i + 1)!r}')
        prev = len(lines) - 2
    plan, _ = mc.mecha_plan(mc.parse_mecha("\n".join(lines)), tmp_path, dtype="f16")
    assert {o.op for o in plan.outputs} <= {"mean", "copy"}
    am.execute(plan, tmp_path / "chain.safetensors", progress=False)
    am.mean([tmp_path / f for f in files], tmp_path / "mean.safetensors", progress=False)
    a, b = am.Checkpoint(tmp_path / "chain.safetensors"), am.Checkpoint(tmp_path / "mean.safetensors")
    for k in a.keys():
        assert a.raw(k).tobytes() == b.raw(k).tobytes(), k


@pytest.mark.parametrize("legacy", [False, True])
def test_published_recipe_shape_with_101_models(tmp_path, legacy):
    """One base, 101 subtract deltas, a robust node, add_difference, weighted_sum: as written."""
    files = make_pool(tmp_path, 101, seed=7)
    n = len(files)
    if legacy:
        head = ['model "base.safetensors" "sdxl" "base"'] + [f'model "{f}" "sdxl" "base"' for f in files]
    else:
        head = ["version 0.1.0", 'model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"'] + [
            f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    body = [f'merge "subtract" &{i + 1} &0' for i in range(n)]
    body.append('merge "ties_sum_extended" ' + " ".join(f"&{n + 1 + i}" for i in range(n))
                + " k=1.0 vote_sgn=true apply_median=true eps=1e-06 maxiter=100 ftol=1e-20")
    body.append(f'merge "add_difference" &0 &{2 * n + 1} alpha=1.0')
    body.append(f'merge "weighted_sum" &{2 * n + 2} &1 alpha=0.25')
    plan, summary = mc.mecha_plan(mc.parse_mecha("\n".join(head + body)), tmp_path, dtype="f64")
    assert summary["passes"]["gram pass"] > 0 and summary["methods"] == ["ties_median"]
    am.execute(plan, tmp_path / "o.safetensors", progress=False)
    out = am.Checkpoint(tmp_path / "o.safetensors")
    base = am.Checkpoint(tmp_path / "base.safetensors")
    models = [am.Checkpoint(tmp_path / f) for f in files]
    for key in ("mat", "conv", "tied"):
        b = base.tensor(key).astype(np.float64)
        m1 = models[0].tensor(key).astype(np.float64)
        merged = b + ref.ties_median([m.tensor(key).astype(np.float64) - b for m in models], 1.0, True)
        expect = 0.75 * merged + 0.25 * m1
        # maxiter=100, ftol=1e-20: see REFS for why the stop bounds agreement near 1e-9
        assert rel_l2(out.tensor(key), expect) <= 1e-8, key
    md = out.metadata
    assert "ties_median" in md["astolfomix.robust"] and md["astolfomix.mecha"].count("subtract") == n


@pytest.mark.parametrize("text,needle", [
    ('version 0.1.0\nmodel "a.safetensors"\nmerge "nope" &0', "unknown method 'nope'"),
    ('version 0.1.0\nmodel "a.safetensors"\nmerge "ties_sum" &0 kk=1', "no parameter 'kk'"),
    ('version 0.1.0\nmodel "a.safetensors"\nmerge "ties_sum" &5', "reference &5"),
    ('version 0.1.0\nmodel "a.safetensors"\ncall "x" &0', "legacy block-weight"),
    ('version 0.1.0\nmodel "a.safetensors"\ndict a=1', "legacy block-weight"),
    ('version 0.2.0\nmodel "a.safetensors"', "version 0.1.0"),
    ('model "a.safetensors"\nmerge "subtract" &0', "takes 2 models"),
    ('model "a.safetensors\nmerge "subtract" &0 &0', "unmatched quote"),
    ('model "a.safetensors"\nmerge "ties_sum" &0 k=abc', "cannot read 'abc'"),
])
def test_recipe_errors_name_the_line(text, needle):
    with pytest.raises(RecipeError, match="line") as ei:
        mc.parse_mecha(text)
    assert needle in str(ei.value)


def test_every_problem_is_listed_and_paths_cannot_escape(tmp_path):
    text = ('version 0.1.0\nmodel "../outside.safetensors"\nmodel "/etc/passwd"\n'
            'merge "nope" &0 &1\nmerge "ties_sum" &0 &1 k=2')
    with pytest.raises(RecipeError) as ei:
        mc.parse_mecha(text)
    msg = str(ei.value)
    assert "unknown method 'nope'" in msg and "line 4" in msg
    rec = mc.parse_mecha('version 0.1.0\nmodel "../outside.safetensors"\nmodel "/etc/passwd"\nmerge "ties_sum" &0 &1')
    with pytest.raises(RecipeError) as ei:
        mc.mecha_plan(rec, tmp_path)
    assert "outside" in str(ei.value) and "/etc/passwd" in str(ei.value)


def test_bad_parameter_values_are_refused_by_the_core(tmp_path):
    files = make_pool(tmp_path, 2)
    with pytest.raises(am.errors.PlanError, match="k must be"):
        mc.mecha_plan(mc.parse_mecha(recipe(files, "ties_sum", k=1.5)), tmp_path)


def test_python_api_builds_the_same_graph(tmp_path):
    files = make_pool(tmp_path, 4, seed=2)
    base = mc.model(tmp_path / "base.safetensors")
    deltas = [mc.merge("subtract", mc.model(tmp_path / f), base) for f in files]
    root = mc.merge("add_difference", base, mc.merge("ties_sum", *deltas, k=0.5), alpha=1.0)
    plan, _ = mc.mecha_plan(root, dtype="f64")
    am.execute(plan, tmp_path / "api.safetensors", progress=False)
    plan2, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, "ties_sum", k=0.5)), tmp_path, dtype="f64")
    am.execute(plan2, tmp_path / "text.safetensors", progress=False)
    a, b = am.Checkpoint(tmp_path / "api.safetensors"), am.Checkpoint(tmp_path / "text.safetensors")
    assert all(a.raw(k).tobytes() == b.raw(k).tobytes() for k in a.keys())
    with pytest.raises(RecipeError, match="unknown method"):
        mc.merge("ties_summ", *deltas)
    assert math.isfinite(float(a.tensor("mat").sum()))


def test_cli_runs_a_mecha_recipe_and_its_dry_run(tmp_path, capsys):
    import json

    from astolfomix_rs.cli import main

    files = make_pool(tmp_path, 4)
    (tmp_path / "dgm.mecha").write_text(recipe(files, "ties_sum_extended", k=0.5, apply_median=True))
    assert main(["merge", str(tmp_path / "dgm.mecha"), "--models", str(tmp_path), "--dry-run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["passes"]["gram pass"] == 9 and d["passes"]["statistics pass"] == 9 and d["estimated_peak_bytes"] > 0
    assert not (tmp_path / "dgm.safetensors").exists()
    assert main(["merge", str(tmp_path / "dgm.mecha"), "--models", str(tmp_path), "--vote", "mass", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sign_rule"] == "mass" and (tmp_path / "dgm.safetensors").exists()
    (tmp_path / "bad.mecha").write_text('version 0.1.0\nmodel "../x.safetensors"\n')
    assert main(["merge", str(tmp_path / "bad.mecha"), "--models", str(tmp_path)]) == 2
    assert "outside" in capsys.readouterr().err


@pytest.mark.parametrize("method,params", list(REFS), ids=[f"{m}-{dict(p)}" for m, p in REFS])
def test_torch_path_runs_the_same_plans(tmp_path, method, params):
    """The torch executor (torch-cpu here, CUDA where present) against the CPU engine: f64 outputs
    within f64 rounding (its sums run in torch's order), identical shapes and non-finite positions."""
    pytest.importorskip("torch")
    files = make_pool(tmp_path, 5, seed=4)
    plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **dict(params))), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "cpu.safetensors", progress=False)
    plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **dict(params))), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "torch.safetensors", device="torch-cpu", progress=False)
    a, b = am.Checkpoint(tmp_path / "cpu.safetensors"), am.Checkpoint(tmp_path / "torch.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():
        x, y = a.tensor(k), b.tensor(k)
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if k == "ids":
            assert np.array_equal(x, y)
            continue
        assert np.array_equal(np.isfinite(x), np.isfinite(y)), k
        assert rel_l2(x[np.isfinite(x)], y[np.isfinite(y)]) <= 1e-12, (k, rel_l2(x[np.isfinite(x)], y[np.isfinite(y)]))


def test_toml_form_is_the_same_graph(tmp_path):
    files = make_pool(tmp_path, 4, seed=9)
    (tmp_path / "r.toml").write_text(
        '[robust]\nbase = "base.safetensors"\nmodels = [' + ", ".join(f'"{f}"' for f in files) + "]\n"
        'method = "ties_sum_extended"\nparams = { k = 0.5, vote_sgn = true, apply_median = true, maxiter = 3 }\n'
        "alpha = 1.0\n")
    plan, _ = mc.mecha_plan(mc.load_mecha(tmp_path / "r.toml"), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "toml.safetensors", progress=False)
    text = recipe(files, "ties_sum_extended", k=0.5, vote_sgn=True, apply_median=True, maxiter=3)
    plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "mecha.safetensors", progress=False)
    a, b = am.Checkpoint(tmp_path / "toml.safetensors"), am.Checkpoint(tmp_path / "mecha.safetensors")
    assert all(a.raw(k).tobytes() == b.raw(k).tobytes() for k in a.keys())
    (tmp_path / "bad.toml").write_text('[robust]\nbase = 3\nmodels = []\nmethod = "nope"\n')
    with pytest.raises(RecipeError) as ei:
        mc.load_mecha(tmp_path / "bad.toml")
    assert "robust.base" in str(ei.value) and "robust.models" in str(ei.value) and "robust.method" in str(ei.value)
    assert mc.is_robust_recipe(tmp_path / "r.toml") and not mc.is_robust_recipe(tmp_path / "missing.toml")


def test_portable_loops_give_the_same_bits_as_the_vector_ones(tmp_path):
    """ASTOLFOMIX_KERNEL=scalar turns off the AVX2 builds of the element-wise loops (a process-wide
    choice, hence the child process): the output must not change."""
    import os
    import subprocess
    import sys

    files = make_pool(tmp_path, 5, seed=12)
    (tmp_path / "r.mecha").write_text(recipe(files, "ties_sum_extended", k=0.5, apply_median=True, maxiter=5))
    code = ("import sys, astolfomix_rs as am\nfrom astolfomix_rs.commands import mecha as mc\n"
            "plan, _ = mc.mecha_plan(mc.load_mecha(sys.argv[1]), sys.argv[2], dtype='f32')\n"
            "am.execute(plan, sys.argv[3], progress=False)\n")
    outs = []
    for kernel in ("scalar", ""):
        env = {**os.environ, "ASTOLFOMIX_KERNEL": kernel}
        out = tmp_path / f"o-{kernel or 'best'}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.mecha"), str(tmp_path), str(out)],
                       env=env, check=True, timeout=120)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_recipe_text_reaches_the_terminal_escaped(tmp_path, capsys):
    from astolfomix_rs.cli import main

    (tmp_path / "evil.mecha").write_text('version 0.1.0\nmodel "a.safetensors"\nmerge "\x1b]0;owned\x07" &0\n')
    assert main(["merge", str(tmp_path / "evil.mecha"), "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err and "line 3" in err


def test_keys_of_one_shape_share_one_expression(tmp_path):
    """The plan holds one compiled expression per recipe shape, not one copy of the N points per
    key (planning 64 SDXL inputs held 174 MB before, 62 MB after)."""
    files = make_pool(tmp_path, 4, seed=2)
    plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, "ties_sum_extended", k=1.0, apply_median=True)), tmp_path)
    exprs = [o.expr for o in plan.outputs if o.op == "expr"]
    assert len(exprs) > 3 and all(e is exprs[0] for e in exprs)
