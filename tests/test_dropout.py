"""DARE / DELLA masks (issue 13): exact against an independent numpy reference of the generator
and the methods, the same bits for any thread count, block size and executor, the right keep
probabilities per rank decile, uncorrelated streams, and sd-mecha 1.1 as a statistical peer."""

from __future__ import annotations

import json
import math

import astolfomix_rs as am
import numpy as np
import pytest
import reference_robust as ref
from astolfomix_rs import _core
from astolfomix_rs.commands import mecha as mc
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import AstolfomixError, RecipeError
from test_robust import make_pool, recipe, rel_l2

CASES = {
    "dare-stock": dict(probability=0.3, k=1.0, seed=5),
    "dare-sum-k": dict(probability=0.5, k=0.6, apply_stock=True, vote_sgn=True, seed=11),
    "della-neg-median": dict(probability=0.1, della_eps=-0.1, k=1.0, vote_sgn=True, apply_median=True, maxiter=3,
                             rescale=False, seed=2),
    "della-pos-trim": dict(probability=0.4, della_eps=0.3, k=0.5, seed=8),
    "della-rows": dict(probability=0.4, della_eps=0.5, rank='"row"', k=1.0, apply_stock=True, seed=3),
}


def expected(deltas, key, params):
    p = dict(params)
    mode = "median" if p.get("apply_median") else ("sum" if p.get("apply_stock") else "stock")
    return ref.ties_dropout(deltas, key, p["seed"], p["probability"], p.get("della_eps", 0.0), p.get("rescale", True),
                            p.get("k", 0.2), bool(p.get("vote_sgn")), mode, p.get("rank") == '"row"',
                            maxiter=p.get("maxiter", 100))


@pytest.fixture(scope="module", params=[1, 2, 3, 17])
def pool(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dpool{request.param}")
    return d, make_pool(d, request.param, seed=20 + request.param)


def check_reference(d, files, tmp_path, method, params, fn):
    """Runs the recipe in f64 and checks every float key against ``base + fn(deltas, key)``."""
    plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **params)), d, dtype="f64")
    am.execute(plan, tmp_path / "o.safetensors", progress=False)
    out, base = am.Checkpoint(tmp_path / "o.safetensors"), am.Checkpoint(d / "base.safetensors")
    models = [am.Checkpoint(d / f) for f in files]
    for key in base.keys():
        if key == "ids":
            continue
        b = base.tensor(key).astype(np.float64)
        expect = b + fn([m.tensor(key).astype(np.float64) - b for m in models], key)
        got = out.tensor(key)
        fin = np.isfinite(expect)
        assert np.array_equal(np.isfinite(got), fin), key
        assert rel_l2(got[fin], expect[fin]) <= 1e-12, (method, key, rel_l2(got[fin], expect[fin]))


@pytest.mark.parametrize("case", list(CASES))
def test_ties_with_dropout_matches_the_float64_reference(pool, tmp_path, case):
    d, files = pool
    check_reference(d, files, tmp_path, "ties_sum_with_dropout", CASES[case],
                    lambda deltas, key: expected(deltas, key, CASES[case]))


def test_dropout_method_matches_the_reference(pool, tmp_path):
    d, files = pool
    check_reference(d, files, tmp_path, "dropout", dict(probability=0.6, rescale=0.5, seed=4),
                    lambda deltas, key: ref.dropout_mean(deltas, key, 4, 0.6, 0.5))


def big_pool(folder, n, shape=(300, 700), seed=0, quantize=True, zero_rows=True):
    """A base and n fine-tunes of one large tensor (fp16-like repeated values, a run of zeros)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape).astype(np.float32)
    save(folder / "base.safetensors", {"w": b})
    files = []
    for i in range(n):
        dlt = (0.01 * rng.standard_normal(shape)).astype(np.float32)
        if quantize:
            dlt = (np.round(dlt * 2000) / 2000).astype(np.float32)
        if zero_rows:
            dlt[: shape[0] // 5] = 0  # untouched rows: many equal |delta|, ranked by position
        save(folder / f"m{i}.safetensors", {"w": b + dlt})
        files.append(f"m{i}.safetensors")
    return files


def run(folder, files, method="ties_sum_with_dropout", out="o.safetensors", dtype="f32", **kw):
    plan, summary = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **kw)), folder, dtype=dtype)
    rep = am.execute(plan, folder / out, progress=False, overwrite=True, threads=kw.pop("_threads", None))
    return folder / out, summary, rep


def test_same_bits_for_threads_chunks_and_both_executors(tmp_path):
    files = big_pool(tmp_path, 5)
    text = recipe(files, "ties_sum_with_dropout", probability=0.3, della_eps=-0.2, k=0.7, vote_sgn=True,
                  apply_median=True, maxiter=4, seed=9)
    outs = []
    for threads, chunk in ((1, 64), (2, 1 << 20), (7, 1000)):
        plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f32")
        o = tmp_path / f"o{threads}.safetensors"
        am.execute(plan, o, threads=threads, chunk=chunk, progress=False)
        outs.append(o.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    pytest.importorskip("torch")
    # N = 1, k = 1, no rescale: out = base + delta * mask exactly on both executors.
    one = recipe(files[:1], "ties_sum_with_dropout", probability=0.5, della_eps=0.4, k=1.0, rescale=False, seed=1)
    for dev in ("cpu", "torch-cpu"):
        plan, _ = mc.mecha_plan(mc.parse_mecha(one), tmp_path, dtype="f32")
        am.execute(plan, tmp_path / f"one-{dev}.safetensors", device=dev, progress=False)
    a = am.Checkpoint(tmp_path / "one-cpu.safetensors").raw("w").tobytes()
    assert a == am.Checkpoint(tmp_path / "one-torch-cpu.safetensors").raw("w").tobytes()
    # and the full method with 5 points: the same masks, sums in torch's order
    plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "t64.safetensors", device="torch-cpu", progress=False)
    plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "c64.safetensors", progress=False)
    x = am.Checkpoint(tmp_path / "t64.safetensors").tensor("w")
    y = am.Checkpoint(tmp_path / "c64.safetensors").tensor("w")
    assert rel_l2(x, y) <= 1e-12


@pytest.mark.parametrize("eps", [0.0, -0.1, 0.1])
@pytest.mark.parametrize("rows", [False, True])
def test_keep_fractions_per_rank_decile(tmp_path, eps, rows):
    """N = 1, k = 1, rescale off: the output's changed elements are the kept ones; per rank decile
    the kept fraction is within 6 sigma of the intended mean probability."""
    files = big_pool(tmp_path, 1, quantize=False, zero_rows=False)
    p = 0.6
    kw = dict(probability=p, della_eps=eps, k=1.0, rescale=False, seed=13)
    if rows:
        kw["rank"] = '"row"'
    o, _, _ = run(tmp_path, files, dtype="f64", **kw)
    b = am.Checkpoint(tmp_path / "base.safetensors").tensor("w").astype(np.float64)
    m = am.Checkpoint(tmp_path / files[0]).tensor("w").astype(np.float64)
    d = m - b
    got = am.Checkpoint(o).tensor("w") - b
    live = d != 0
    kept = (got != 0) & live
    q = ref.keep_prob(d, p, eps, rows)
    qd = q.reshape(d.shape)
    flat_live = live.ravel()
    r = (np.concatenate([ref.ordinal_ranks(s) / s.size for s in d]) if rows else ref.ordinal_ranks(d.ravel()) / d.size)
    dec = np.minimum((r * 10).astype(int), 9)
    for i in range(10):
        sel = (dec == i) & flat_live
        n = sel.sum()
        assert n > 1000
        want = qd.ravel()[sel].mean()
        have = kept.ravel()[sel].mean()
        sigma = math.sqrt(max(want * (1 - want), 1e-12) / n)
        assert abs(have - want) <= 6 * sigma, (eps, rows, i, have, want)
    if eps:
        lo, hi = kept.ravel()[(dec == 0) & flat_live].mean(), kept.ravel()[(dec == 9) & flat_live].mean()
        assert (hi - lo) * np.sign(eps) > 0.05  # the rank term is really there


def test_masks_of_models_and_seeds_are_uncorrelated():
    n = 200_000
    v = np.random.default_rng(1).standard_normal(n)
    def m(seed, model):
        return np.frombuffer(_core.robust_mask(v, 0, seed, "k", model, 0.5), np.float64)
    bound = 6 / math.sqrt(n)
    pairs = [(m(1, 0), m(1, 1)), (m(1, 0), m(2, 0)), (m(1, 3), m(7, 4))]
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) <= bound
        assert abs(a.mean() - 0.5) <= 6 * math.sqrt(0.25 / n)
    # neighbouring elements of one stream are independent too
    a = m(5, 0)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) <= bound
    # and the generator is the reference's, draw for draw
    k = np.frombuffer(_core.robust_mask(v[:5000], 123_456, 42, "model.x", 3, 0.3), np.float64)
    want = (ref.draws(42, "model.x", 3, 123_456 + 5000)[123_456:] < 0.7).astype(np.float64)
    assert np.array_equal(k, want)


@pytest.mark.parametrize("eps", [0.1, -0.1, 1.0, 5.0])
def test_keep_probability_within_1e4_of_the_exact_rank_formula(eps):
    rng = np.random.default_rng(2)
    cont = rng.standard_normal(300_000) * 1e-3
    quant = np.round(cont * 3000) / 3000  # fp16-like: heavy repeated values
    quant[50_000:120_000] = 0.0  # a long run of equal values, ranked by position
    for vals in (cont, quant, np.zeros(20_000), np.full(7, 2.0)):
        r = np.frombuffer(_core.robust_ranks(vals, eps), np.float64)
        n = vals.size
        exact = ref.ordinal_ranks(vals)
        q_hat = np.clip(0.5 + (r / n - (n + 1) / (2 * n)) * eps, 0, 1)
        q = np.clip(0.5 + (exact / n - (n + 1) / (2 * n)) * eps, 0, 1)
        assert np.abs(q_hat - q).max() <= 1e-4, (eps, np.abs(q_hat - q).max())


def test_against_sd_mecha_keep_fractions(tmp_path):
    """sd-mecha 1.1's ties_sum_with_dropout on the same single delta (N = 1, k = 1, rescale off):
    its zeros are its dropped elements; per rank decile the kept fractions agree within binomial
    noise with ours (its masks come from torch's generator, so only the statistics can agree)."""
    pytest.importorskip("sd_mecha")
    import torch
    from sd_mecha.extensions.builtin.merge_methods import ties

    rng = np.random.default_rng(4)
    d = rng.standard_normal((200, 600)) * 1e-2
    files_dir = tmp_path
    save(files_dir / "base.safetensors", {"w": np.zeros_like(d)})
    save(files_dir / "m0.safetensors", {"w": d})
    for eps in (-0.1, 0.1):
        theirs = ties.ties_sum_with_dropout.__wrapped__(
            torch.from_numpy(d), probability=0.4, della_eps=eps, rescale=False, k=1.0, vote_sgn=True,
            apply_stock=True, seed=3).numpy()
        o, _, _ = run(files_dir, ["m0.safetensors"], dtype="f64", probability=0.4, della_eps=eps, k=1.0,
                      rescale=False, vote_sgn=True, apply_stock=True, seed=3)
        ours = am.Checkpoint(o).tensor("w")
        r = ref.ordinal_ranks(d.ravel()) / d.size
        dec = np.minimum((r * 10).astype(int), 9)
        for i in range(10):
            sel = dec == i
            n = sel.sum()
            a, b = (ours.ravel()[sel] != 0).mean(), (theirs.ravel()[sel] != 0).mean()
            pq = (a + b) / 2
            assert abs(a - b) <= 6 * math.sqrt(max(pq * (1 - pq), 1e-6) * 2 / n), (eps, i, a, b)


def dgmla(files: list[str], legacy: bool = False, seed: int | str = 0) -> str:
    """The published DGMLA shape: base, the base as a zero delta, N subtract deltas,
    ties_sum_with_dropout with apply_median, add_difference, a weighted_sum with the base."""
    if legacy:
        lines = ['model "base.safetensors" "sdxl" "base"'] + [f'model "{f}" "sdxl" "base"' for f in files]
    else:
        lines = ["version 0.1.0", 'model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"']
        lines += [f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    n = len(files)
    lines.append('merge "subtract" &0 &0')
    lines += [f'merge "subtract" &{i + 1} &0' for i in range(n)]
    refs = " ".join(f"&{n + 1 + i}" for i in range(n + 1))
    lines.append(f'merge "ties_sum_with_dropout" {refs} probability=0.1 della_eps=-0.1 rescale=false k=1.0 '
                 f"vote_sgn=true apply_median=true seed={seed}")
    lines.append(f'merge "add_difference" &0 &{2 * n + 2} alpha=1.0')
    lines.append(f'merge "weighted_sum" &{2 * n + 3} &0 alpha=0.1')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("legacy", [False, True])
def test_published_dgmla_recipe_with_101_models(tmp_path, legacy):
    rng = np.random.default_rng(6)
    base = {"a": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    save(tmp_path / "base.safetensors", base)
    files = []
    for i in range(101):
        save(tmp_path / f"ft{i:03d}.safetensors", {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                                                    for k, v in base.items()})
        files.append(f"ft{i:03d}.safetensors")
    text = dgmla(files, legacy)
    (tmp_path / "r.mecha").write_text(text)
    plan, summary = mc.mecha_plan(mc.load_mecha(tmp_path / "r.mecha"), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "o.safetensors", progress=False)
    out = am.Checkpoint(tmp_path / "o.safetensors")
    models = [am.Checkpoint(tmp_path / f) for f in files]
    for k, b in base.items():
        b64 = b.astype(np.float64)
        deltas = [np.zeros_like(b64)] + [m.tensor(k).astype(np.float64) - b64 for m in models]
        merged = b64 + ref.ties_dropout(deltas, k, 0, 0.1, -0.1, False, 1.0, True, "median")
        expect = 0.9 * merged + 0.1 * b64
        # the published defaults (maxiter=100, ftol=1e-20): see README on where Weiszfeld stops
        assert rel_l2(out.tensor(k), expect) <= 1e-8, k
    meta = json.loads(out.metadata["astolfomix.robust"])
    assert meta["seeds"] == [{"line": len(text.splitlines()) - 2, "method": "ties_sum_with_dropout", "seed": 0, "drawn": False}]
    assert meta["mask_generator"] == _core.mask_generator() and "lowbias32" in meta["mask_generator"]
    assert "sign_rule" in meta and summary["seeds"][0]["seed"] == 0


def test_seeds_drawn_recorded_and_reproducible(tmp_path):
    files = big_pool(tmp_path, 3, shape=(20, 30))
    o1, s1, _ = run(tmp_path, files, out="a.safetensors", probability=0.5, seed=7)
    o2, _, _ = run(tmp_path, files, out="b.safetensors", probability=0.5, seed=7)
    o3, _, _ = run(tmp_path, files, out="c.safetensors", probability=0.5, seed=8)
    assert o1.read_bytes() == o2.read_bytes() != o3.read_bytes()
    o4, s4, _ = run(tmp_path, files, out="d.safetensors", probability=0.5, seed="null")
    drawn = s4["seeds"][0]
    assert drawn["drawn"] and 0 <= drawn["seed"] < 2**53
    rec = json.loads(am.Checkpoint(o4).metadata["astolfomix.robust"])["seeds"][0]
    assert rec["seed"] == drawn["seed"]
    o5, _, _ = run(tmp_path, files, out="e.safetensors", probability=0.5, seed=drawn["seed"])
    assert am.Checkpoint(o5).raw("w").tobytes() == am.Checkpoint(o4).raw("w").tobytes()


@pytest.mark.parametrize("text,needle", [
    ('merge "ties_sum_with_dropout" &1 probability=1.5', "probability must be in [0, 1]"),
    ('merge "ties_sum_with_dropout" &1 rank="column"', 'rank must be "tensor" or "row"'),
    ('merge "ties_sum_with_dropout" &1 seed=1.5', "seed must be a whole number"),
    ('merge "dropout" &1 overlap=2.0', "only odd whole overlap"),
    ('merge "ties_sum_with_dropout" &1 della=0.1', "has no parameter 'della'"),
])
def test_dropout_parameter_errors_name_the_line(text, needle):
    src = 'model "a.safetensors" model_config="sdxl-sgm" merge_space="weight"\n' + text.replace("&1", "&0") + "\n"
    with pytest.raises(RecipeError) as ei:
        mc.parse_mecha("version 0.1.0\n" + src)
    assert needle in str(ei.value) and "line 3" in str(ei.value)


def test_probability_one_is_zero_and_core_refuses_bad_masks(tmp_path):
    files = big_pool(tmp_path, 2, shape=(4, 6))
    o, _, _ = run(tmp_path, files, dtype="f64", probability=1.0, seed=1)
    b = am.Checkpoint(tmp_path / "base.safetensors").tensor("w")
    assert np.array_equal(am.Checkpoint(o).tensor("w"), b.astype(np.float64))
    with pytest.raises(AstolfomixError, match="probability"):
        _core.robust_mask(np.zeros(3), 0, 0, "k", 0, 1.5)


@pytest.mark.parametrize("case", [*CASES, "dropout"])
def test_torch_path_draws_the_same_masks(tmp_path, case):
    """Every variant on the torch executor: the same masks (drawn by the engine's generator), sums
    in torch's order, so f64 outputs within 1e-12 and the same non-finite places."""
    pytest.importorskip("torch")
    files = make_pool(tmp_path, 5, seed=41)
    method, params = ("dropout", dict(probability=0.5, seed=6)) if case == "dropout" else ("ties_sum_with_dropout", CASES[case])
    for dev in ("cpu", "torch-cpu"):
        plan, _ = mc.mecha_plan(mc.parse_mecha(recipe(files, method, **params)), tmp_path, dtype="f64")
        am.execute(plan, tmp_path / f"{dev}.safetensors", device=dev, progress=False)
    a, b = am.Checkpoint(tmp_path / "cpu.safetensors"), am.Checkpoint(tmp_path / "torch-cpu.safetensors")
    for k in a.keys():
        x, y = a.tensor(k), b.tensor(k)
        if k == "ids":
            assert np.array_equal(x, y)
            continue
        assert np.array_equal(np.isfinite(x), np.isfinite(y)), k
        assert rel_l2(x[np.isfinite(x)], y[np.isfinite(y)]) <= 1e-12, (case, k)


def test_cli_prints_and_records_the_seed(tmp_path, capsys):
    from astolfomix_rs.cli import main

    files = big_pool(tmp_path, 3, shape=(8, 9))
    (tmp_path / "r.mecha").write_text(recipe(files, "ties_sum_with_dropout", probability=0.3, seed="null"))
    assert main(["merge", str(tmp_path / "r.mecha"), "--models", str(tmp_path), "--dry-run"]) == 0
    assert "(drawn) for ties_sum_with_dropout" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "r.mecha"), "--models", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    seed = out["seeds"][0]["seed"]
    meta = json.loads(am.Checkpoint(tmp_path / "r.safetensors").metadata["astolfomix.robust"])
    assert meta["seeds"][0]["seed"] == seed and meta["seeds"][0]["drawn"]
