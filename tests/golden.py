"""Outputs whose bytes must never change by accident: the demo merge, the 42-model recipe merge,
an export/import round trip and plain means. ``python tests/golden.py`` prints their sha256;
``test_golden.py`` compares them with ``golden.json``, recorded before the plan refactor."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def outputs(folder: Path, device: str = "cpu") -> dict[str, str]:
    import astolfomix_rs as am
    from astolfomix_rs.commands import recipe as rc
    from astolfomix_rs.tools.synth import make_checkpoint

    out: dict[str, str] = {}
    demo = folder / "demo"
    res = _demo(demo)
    out["demo"] = sha(Path(res))

    pool = folder / "pool"
    pool.mkdir()
    for i in range(1, 43):
        make_checkpoint(pool / f"_x{i:02d}-model{i}.safetensors", "sdxl", factor=64, seed=i)
    for name, seed in (("x05a-_x09_x10.safetensors", 510), ("x11a-_x11_x12.safetensors", 511)):
        make_checkpoint(pool / name, "sdxl", factor=64, seed=seed)
    te0 = [f"{i:02d}" for i in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25)] + ["05a"]
    text = (f"unet: {','.join(f'{i:02d}' for i in range(1, 33))}=32\n"
            f"te0: {','.join(te0)}={len(te0)}\n"
            "te1: 02,04,06=-3\n"
            "main=x31-AstolfoMix-x13te0x38te1.safetensors\n")
    (pool / "r.txt").write_text(text)
    plan, summary = rc.merge_plan(rc.load(pool / "r.txt"), pool, base="40", hash_inputs=True)
    target = folder / summary["output_name"]
    am.execute(plan, target, progress=False, device=device)
    out["recipe42"] = sha(target)

    from astolfomix_rs.commands import components as tk

    rt = folder / "rt"
    rt.mkdir()
    xl = make_checkpoint(rt / "xl.safetensors", "sdxl", factor=16, seeds={"clip_l": 11})
    sd1 = make_checkpoint(rt / "sd1.safetensors", "sd1", factor=16, seed=5)
    tk.export(xl, "te0", rt / "te0.safetensors", dtype="same")
    out["export_te0"] = sha(rt / "te0.safetensors")
    tk.import_component(sd1, rt / "te0.safetensors", "te", rt / "sd1_xlclip.safetensors")
    out["import_te"] = sha(rt / "sd1_xlclip.safetensors")
    tk.import_component(xl, sd1, "te0", rt / "xl_sd1clip.safetensors")
    out["import_te0"] = sha(rt / "xl_sd1clip.safetensors")

    files = [pool / f"_x{i:02d}-model{i}.safetensors" for i in (1, 2, 3)]
    am.mean(files, folder / "m.safetensors", progress=False, device=device)
    out["mean"] = sha(folder / "m.safetensors")
    am.mean(files, folder / "w.safetensors", weights=[1, 2, 3], accumulate="f64", dtype="bf16", progress=False,
            device=device)
    out["mean_weighted_f64_bf16"] = sha(folder / "w.safetensors")
    am.mean(files[:1], folder / "c.safetensors", dtype="f32", progress=False, device=device)
    out["convert_f32"] = sha(folder / "c.safetensors")
    return out


def _demo(folder: Path) -> str:
    from astolfomix_rs.cli.merge import run_demo

    return run_demo(folder, log=lambda *a: None)["output"]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(outputs(Path(d), *sys.argv[1:]), indent=2))
