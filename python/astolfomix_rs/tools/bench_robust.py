"""``astolfomix bench --method NAME``: a robust merge run by this tool and by sd-mecha (when
installed) on the same synthetic fine-tunes (a base plus a per-model delta of realistic scale), in
one run with the read floor: seconds, peak RssAnon, max difference between the two outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.save import save
from .synth import make_state

METHODS: dict[str, dict[str, Any]] = {
    "ties_sum": {"k": 1.0, "vote_sgn": True},
    "ties_sum_extended": {"k": 1.0, "vote_sgn": True, "apply_median": True},
    "geometric_median": {},
    "model_stock": {},
    "n_average": {},
    # DGMLA as published: DELLA masks, TIES sign by mass, geometric median, no rescale
    "ties_sum_with_dropout": {"probability": 0.1, "della_eps": -0.1, "rescale": False, "k": 1.0, "vote_sgn": True,
                              "apply_median": True, "seed": 0},
    "dropout": {"probability": 0.9, "seed": 0},
}


def make_finetunes(folder: Path, n: int, arch: str = "sdxl", factor: int = 4, seed: int = 0,
                   scale: float = 2e-3, log: Callable[[str], None] = print) -> list[str]:
    """``base.safetensors`` and ``ft000..`` fp16 fine-tunes, each the base plus a Gaussian delta
    of ``scale`` (fine-tune deltas are small against weights of order 0.01-1). Existing files
    are kept, so a larger N reuses a smaller one's."""
    folder.mkdir(parents=True, exist_ok=True)
    base_path = folder / "base.safetensors"
    base = make_state(arch, factor=factor, seed=seed, fast=True)
    if not base_path.exists():
        save(base_path, base, durable=False)
    names = []
    for i in range(n):
        name = f"ft{i:03d}.safetensors"
        names.append(name)
        if (folder / name).exists():
            continue
        rng = np.random.default_rng([seed, i + 1])
        state = {}
        for k, v in base.items():
            if isinstance(v, np.ndarray) and v.dtype == np.float16:
                d = rng.standard_normal(v.shape, dtype=np.float32) * np.float32(scale)
                state[k] = (v.astype(np.float32) + d).astype(np.float16)
            else:
                state[k] = v
        save(folder / name, state, durable=False)
        log(f"  wrote {name}")
    return names


def mecha_text(files: list[str], method: str, params: dict[str, Any]) -> str:
    """The published recipes' shape: base, N deltas, one robust node, add_difference."""
    lines = ["version 0.1.0", 'model "base.safetensors" model_config="sdxl-sgm" merge_space="weight"']
    lines += [f'model "{f}" model_config="sdxl-sgm" merge_space="weight"' for f in files]
    n = len(files)
    if method == "n_average":
        lines.append('merge "n_average" ' + " ".join(f"&{i + 1}" for i in range(n)))
        return "\n".join(lines) + "\n"
    lines += [f'merge "subtract" &{i + 1} &0' for i in range(n)]
    kw = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    lines.append(f'merge "{method}" ' + " ".join(f"&{n + 1 + i}" for i in range(n)) + (" " + kw if kw else ""))
    lines.append(f'merge "add_difference" &0 &{2 * n + 1} alpha=1.0')
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    n: int
    input_bytes: int
    floor_s: float
    ours_s: float | None = None
    ours_peak_anon_mb: float | None = None
    ours_read_bytes: int | None = None
    sd_mecha_s: float | None = None
    sd_mecha_peak_anon_mb: float | None = None
    max_abs_diff: float | None = None
    #: the page cache was emptied before the floor and before each tool's run (root only)
    cold: bool = False
    notes: list[str] = field(default_factory=list)


def drop_caches() -> bool:
    """Empties the page cache, so the floor and each run read the inputs from disk alike (a floor
    read right after the previous N's run is partly served from memory). Root only; False where
    not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _sampled(cmd: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    from .bench import run_sampled

    out, err, rc, peak = run_sampled(cmd, timeout)
    if rc != 0:
        raise RuntimeError(f"{cmd[3] if len(cmd) > 3 else cmd}: failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak / 1024


def bench_method(method: str, ns: list[int], *, folder: Path, arch: str = "sdxl", factor: int = 4,
                 threads: int | None = None, sd_mecha_ns: tuple[int, ...] = (8,), timeout: float = 5400,
                 log: Callable[[str], None] = print, precision: str = "f64") -> list[Row]:
    """For each N: the read floor (``cat`` of the inputs, one pass), this tool's merge, and
    sd-mecha's for N in ``sd_mecha_ns`` (where installed), each in a child process sampled for
    RssAnon. Both tools work in ``precision`` (sd-mecha's ``merge_dtype``). Where permitted (root),
    the page cache is emptied before the floor and before each tool's run, so all read from disk."""
    if method not in METHODS:
        raise SystemExit(f"unknown method '{method}' (bench covers {', '.join(METHODS)})")
    rows = []
    log(f"generating up to {max(ns)} {arch} fine-tunes (dimensions / {factor}) in {folder} ...")
    all_files = make_finetunes(folder, max(ns), arch, factor, log=log)
    have_sd = _has_sd_mecha()
    for n in ns:
        files = all_files[:n]
        text = mecha_text(files, method, METHODS[method])
        rpath = folder / f"bench-{method}-{n}.mecha"
        rpath.write_text(text)
        paths = [folder / "base.safetensors"] + [folder / f for f in files]
        in_bytes = sum(p.stat().st_size for p in paths)
        cold = drop_caches()
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        row = Row(n=n, input_bytes=in_bytes, floor_s=time.perf_counter() - t, cold=cold)
        row.cold = row.cold and drop_caches()
        out = folder / f"ours-{method}-{n}.safetensors"
        res, peak = _sampled([sys.executable, "-m", "astolfomix_rs.tools.bench_robust", "ours",
                              json.dumps({"recipe": str(rpath), "models": str(folder), "out": str(out),
                                          "threads": threads, "precision": precision})], timeout)
        row.ours_s, row.ours_peak_anon_mb, row.ours_read_bytes = res["seconds"], peak, res["bytes_read"]
        log(f"N={n}: floor {row.floor_s:.1f} s ({in_bytes / 1e9:.1f} GB{', cold cache' if row.cold else ''}), "
            f"ours {row.ours_s:.1f} s "
            f"({row.ours_s / row.floor_s:.2f}x floor), peak RssAnon {peak:.0f} MB")
        if have_sd and n in sd_mecha_ns:
            sd_out = folder / f"sdmecha-{method}-{n}.safetensors"
            if row.cold:
                drop_caches()
            try:
                res, peak = _sampled([sys.executable, "-m", "astolfomix_rs.tools.bench_robust", "sd-mecha",
                                      json.dumps({"recipe": str(rpath), "models": str(folder), "out": str(sd_out),
                                                  "precision": precision})],
                                     timeout)
                row.sd_mecha_s, row.sd_mecha_peak_anon_mb = res["seconds"], peak
                row.max_abs_diff = _max_diff(out, sd_out)
                log(f"  sd-mecha {row.sd_mecha_s:.1f} s, peak RssAnon {peak:.0f} MB; "
                    f"ours is {row.sd_mecha_s / row.ours_s:.1f}x faster with {peak / max(row.ours_peak_anon_mb, 1):.1f}x "
                    f"lower peak; max |difference| {row.max_abs_diff:.3g}")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                row.notes.append(f"sd-mecha failed: {str(e)[-300:]}")
                log(f"  sd-mecha failed: {str(e)[-300:]}")
            sd_out.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        rows.append(row)
    return rows


def _max_diff(a: Path, b: Path) -> float:
    from ..core.reader import Checkpoint

    x, y = Checkpoint(a), Checkpoint(b)
    worst = 0.0
    for k in x.keys():
        if k in y and x.info[k].is_float and y.info[k].is_float:
            d = np.abs(x.tensor(k).astype(np.float64) - y.tensor(k).astype(np.float64).reshape(x.info[k].shape))
            worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
    return worst


def _has_sd_mecha() -> bool:
    import importlib.util

    return importlib.util.find_spec("sd_mecha") is not None


def table(rows: list[Row], method: str, precision: str = "f64") -> str:
    cold = all(r.cold for r in rows)
    lines = [f"{method} ({precision}, {'cold cache before each' if cold else 'warm page cache'}): N, input GB, floor s, "
             "ours s, ours/floor, ours RssAnon MB, sd-mecha s, sd-mecha RssAnon MB"]
    for r in rows:
        sd = (f"{r.sd_mecha_s:.1f}", f"{r.sd_mecha_peak_anon_mb:.0f}") if r.sd_mecha_s else ("-", "-")
        lines.append(f"{r.n:4d} {r.input_bytes / 1e9:8.2f} {r.floor_s:8.1f} {r.ours_s or 0:8.1f} "
                     f"{(r.ours_s or 0) / r.floor_s:8.2f} {r.ours_peak_anon_mb or 0:10.0f} {sd[0]:>10} {sd[1]:>10}")
    return "\n".join(lines)


def _worker(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    if kind == "ours":
        import astolfomix_rs as am
        from astolfomix_rs.commands import mecha as mc

        t = time.perf_counter()
        plan, _ = mc.mecha_plan(mc.load_mecha(args["recipe"]), args["models"], dtype="f16",
                                precision=args.get("precision", "f64"))
        rep = am.execute(plan, args["out"], threads=args.get("threads"), progress=False, durable=False, overwrite=True)
        return {"seconds": time.perf_counter() - t, "bytes_read": rep.bytes_read}
    if kind == "sd-mecha":
        import sd_mecha  # type: ignore[import-not-found]
        import torch

        sd_mecha.extensions.model_dirs.add_path(args["models"])
        t = time.perf_counter()
        recipe = sd_mecha.deserialize(Path(args["recipe"]).read_text().strip())  # it cannot read blank lines
        dt = torch.float32 if args.get("precision") == "f32" else torch.float64
        sd_mecha.merge(recipe, output=args["out"], merge_dtype=dt, output_dtype=torch.float16,
                       threads=os.cpu_count())
        return {"seconds": time.perf_counter() - t}
    raise SystemExit(f"unknown worker kind {kind}")


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], json.loads(sys.argv[2]))))
