"""Iso-C / Iso-Z (`isotropic_overrided`, issue 13): against a float64 numpy SVD reference for 2-D
tensors, flattened 4-D ones with apply_high_dim and the pass-through cases, on both executors, and
in the 2025 recipe shape (a robust node, the isotropic step, add_difference, fallback)."""

from __future__ import annotations

import astolfomix_rs as am
import numpy as np
import pytest
import reference_robust as ref
from astolfomix_rs.commands import mecha as mc
from astolfomix_rs.errors import RecipeError
from test_robust import make_pool, rel_l2

PARAMS = [dict(z_cof=0.0), dict(z_cof=0.5, apply_high_dim=True), dict(z_cof=-0.3, apply_exp=True),
          dict(z_cof=2.0, apply_exp=True, apply_high_dim=True)]


def iso_recipe(files, params, method="isotropic_overrided", fallback=True):
    lines = ["version 0.1.0", 'model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"']
    lines += [f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    n = len(files)
    lines += [f'merge "subtract" &{i + 1} &0' for i in range(n)]
    lines.append('merge "ties_sum" ' + " ".join(f"&{n + 1 + i}" for i in range(n)) + " k=1.0")
    kw = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    lines.append(f'merge "{method}" &{2 * n + 1} {kw}')
    lines.append(f'merge "add_difference" &0 &{2 * n + 2} alpha=0.8')
    if fallback:
        lines.append(f'merge "fallback" &{2 * n + 3} &0')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("params", PARAMS, ids=[str(p) for p in PARAMS])
@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_isotropic_matches_the_numpy_svd_reference(tmp_path, params, device):
    if device != "cpu":
        pytest.importorskip("torch")
    files = make_pool(tmp_path, 4, seed=31)
    plan, summary = mc.mecha_plan(mc.parse_mecha(iso_recipe(files, params)), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "o.safetensors", device=device, progress=False)
    assert summary["passes"]["isotropic (whole tensor)"] > 0
    out, base = am.Checkpoint(tmp_path / "o.safetensors"), am.Checkpoint(tmp_path / "base.safetensors")
    models = [am.Checkpoint(tmp_path / f) for f in files]
    checked_2d = checked_4d = 0
    for key in base.keys():
        if key == "ids":
            continue
        b = base.tensor(key).astype(np.float64)
        merged = ref.ties_sum([m.tensor(key).astype(np.float64) - b for m in models])
        expect = b + 0.8 * ref.isotropic(merged, **params)
        got = out.tensor(key)
        fin = np.isfinite(expect)
        assert np.array_equal(np.isfinite(got), fin), key
        assert rel_l2(got[fin], expect[fin]) <= 1e-10, (key, rel_l2(got[fin], expect[fin]))
        checked_2d += b.ndim == 2 and np.abs(merged).sum() > 0
        checked_4d += b.ndim == 4 and bool(params.get("apply_high_dim"))
    assert checked_2d >= 3 and checked_4d == (1 if params.get("apply_high_dim") else 0)


def test_plain_name_and_pass_through(tmp_path):
    files = make_pool(tmp_path, 3, seed=32)
    plan, _ = mc.mecha_plan(mc.parse_mecha(iso_recipe(files, {"z_cof": 1.0}, "isotropic")), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "iso1.safetensors", progress=False)
    plan, _ = mc.mecha_plan(mc.parse_mecha(iso_recipe(files, {"z_cof": 0.0})), tmp_path, dtype="f64")
    am.execute(plan, tmp_path / "iso0.safetensors", progress=False)
    a, c = am.Checkpoint(tmp_path / "iso1.safetensors"), am.Checkpoint(tmp_path / "iso0.safetensors")
    # z = 1 leaves the merge as it is (to SVD rounding); 1-D and 4-D (no apply_high_dim) pass through
    base = am.Checkpoint(tmp_path / "base.safetensors")
    models = [am.Checkpoint(tmp_path / f) for f in files]
    for key in ("mat", "vec", "conv"):
        b = base.tensor(key).astype(np.float64)
        plain = b + 0.8 * ref.ties_sum([m.tensor(key).astype(np.float64) - b for m in models])
        assert rel_l2(a.tensor(key), plain) <= 1e-12, key
        if key != "mat":
            assert np.array_equal(c.tensor(key), a.tensor(key)), key
    s = np.linalg.svd((c.tensor("mat") - base.tensor("mat").astype(np.float64)) / 0.8, compute_uv=False)
    assert np.ptp(s) <= 1e-12 * s.max()  # Iso-C: a flat spectrum


def test_isotropic_errors():
    with pytest.raises(RecipeError, match="has no parameter 'z'"):
        mc.parse_mecha('model "a.safetensors" "sdxl" "base"\nmerge "isotropic_overrided" &0 z=1\n')
    with pytest.raises(RecipeError, match="takes 1 models"):
        mc.parse_mecha('model "a.safetensors" "sdxl" "base"\nmerge "isotropic" &0 &0\n')
