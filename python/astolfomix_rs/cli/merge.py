"""CLI subcommands for recipes: ``merge`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..commands import mecha as mc
from ..commands import recipe as rc
from ..commands.inspect import inspect_file
from ..core.engine import execute
from ..core.reader import Checkpoint
from ..errors import RecipeError
from ..tools.synth import make_checkpoint
from .common import add_cache_args, cache_from, command, emit, human_bytes, report_text, say, thread_count

DEMO_RECIPE = """\
```
te0: 01,--,03,--,05a,--=3
te1: 01,02,--,04,05a,06=5
=sd: --,-02,--,04,--,--
7te0

te0:01,--,03,04,--,06
te1: --,02,03,--,05a,06=4

x02te1-AstolfoMix-_x01_x02

unet: 01,02,--,04,--,06,07,08=6
alt:  01,--,03,04,--,--,07,--=4
x01a: 01,02,--,--,--,--,07,08

main=x05-AstolfoMix-x03te0x03te1.safetensors
alt=x03b-AstolfoMix-x03te0x03te1.safetensors
```
"""


def _estimate(bytes_to_read: int) -> float:
    """Seconds at a conservative 2 GB/s (a 2-core box reads warm inputs at 3-10 GB/s)."""
    return bytes_to_read / 2e9


def _merge_mecha(args: argparse.Namespace) -> int:
    """``merge RECIPE.mecha`` (sd-mecha's format) or a TOML recipe with a ``[robust]`` table."""
    recipe = mc.load_mecha(args.recipe)
    plan, summary = mc.mecha_plan(recipe, Path(args.models), dtype=args.dtype or "f16", vote=args.vote,
                                  precision=args.precision)
    out_dir = Path(args.out_dir or args.models)
    target = Path(args.o) if args.o else rc.safe_join(out_dir, Path(args.recipe).stem + ".safetensors", "output")
    threads = args.threads or os.cpu_count() or 1
    summary.update(output=str(target), estimated_seconds=round(_estimate(summary["bytes_to_read"]), 1),
                   estimated_peak_bytes=mc.peak_bytes(plan, threads))
    # Random nodes: the seed each runs with (drawn ones too), so the run can be repeated.
    seeds = "".join(f"\nseed {s['seed']} ({'drawn' if s['drawn'] else 'given'}) for {s['method']}"
                    + (f" on line {s['line']}" if s["line"] else "") for s in summary.get("seeds", []))
    if args.dry_run:
        passes = ", ".join(f"{k} x{v}" for k, v in summary["passes"].items() if v)
        text = (f"robust merge of {len(summary['inputs'])} models -> {target}\n"
                f"methods: {', '.join(summary['methods']) or 'linear only'}; sign rule: {summary['sign_rule']}; "
                f"precision {summary['precision']}\n"
                f"tensors: {passes}\n"
                f"reads {human_bytes(summary['bytes_to_read'])} over all passes, about {summary['estimated_seconds']} s; "
                f"peak memory about {human_bytes(summary['estimated_peak_bytes'])} ({threads} threads)" + seeds)
        emit(args, summary, text)
        return 0
    rep = execute(plan, target, device=args.device, threads=args.threads, progress=not args.json,
                  overwrite=args.overwrite, durable=not args.no_fsync)
    emit(args, {**summary, "report": rep.as_dict()}, report_text(rep) + seeds)
    return 0


@command("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    if mc.is_robust_recipe(args.recipe):
        return _merge_mecha(args)
    if args.precision:
        raise RecipeError("--precision is for robust recipes (.mecha, TOML [robust]); means use --accumulate")
    r = rc.load(args.recipe)
    plan, summary = rc.merge_plan(r, Path(args.models), output=args.output, base=args.base, dtype=args.dtype,
                                  accumulate=args.accumulate, hash_inputs=args.hash_inputs,
                                  hash_cache=cache_from(args), progress=not args.json)
    for note in r.notes:
        if not args.json:
            say(f"note: {note}")
    out_dir = Path(args.out_dir or args.models)
    target = Path(args.o) if args.o else rc.safe_join(out_dir, summary["output_name"], "output")
    summary["output"] = str(target)
    summary["estimated_seconds"] = round(_estimate(summary["bytes_to_read"]), 1)
    if args.dry_run:
        lines = [f"{summary['arch']} merge -> {target}", f"base: {summary['base']}"]
        for c, files in summary["components"].items():
            w = summary["weights"].get(c)
            lines.append(f"{c}: {'weighted ' if w else ''}mean of {len(files)}: " + ", ".join(Path(f).name for f in files)
                         + (f" (weights {', '.join(f'{x:g}' for x in w)}, normalised to sum 1)" if w else ""))
        lines.append(f"reads {human_bytes(summary['bytes_to_read'])}, writes about {human_bytes(summary['output_bytes'])}, "
                     f"about {summary['estimated_seconds']} s on the CPU")
        emit(args, summary, "\n".join(lines))
        return 0
    rep = execute(plan, target, device=args.device, threads=args.threads, progress=not args.json,
                  overwrite=args.overwrite, durable=not args.no_fsync)
    emit(args, {**summary, "report": rep.as_dict()}, report_text(rep))
    return 0


def run_demo(folder: Path, n_models: int = 8, factor: int = 16, log=say) -> dict:
    """Writes a synthetic SDXL pool and the grid recipe, merges, inspects; returns timings."""

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n_models + 1):
        # Models 01-04 keep the base text encoders (like most SDXL finetunes); the rest trained them.
        seeds = {"clip_l": 0, "clip_g": 0, "vae": 0} if i <= 4 else {"vae": 0}
        make_checkpoint(folder / f"_x{i:02d}-demoModel{i}.safetensors", "sdxl", factor=factor, seed=i, seeds=seeds)
    make_checkpoint(folder / "x05a-_x09_x10.safetensors", "sdxl", factor=factor, seed=510, seeds={"vae": 0})
    (folder / "recipe.txt").write_text(DEMO_RECIPE)
    t_gen = time.perf_counter() - t0
    log(f"wrote {n_models + 1} synthetic SDXL-layout models (dimensions / {factor}) and recipe.txt to {folder}")
    r = rc.load(folder / "recipe.txt")
    for note in r.notes:
        log(f"recipe: {note}")
    plan, summary = rc.merge_plan(r, folder, output="main", hash_inputs=True)
    for c, files in summary["components"].items():
        log(f"  {c}: mean of {len(files)} ({', '.join(Path(f).name.split('-')[0] for f in files)})")
    target = folder / summary["output_name"]
    rep = execute(plan, target, progress=True, overwrite=True)
    log(report_text(rep))
    info = inspect_file(target)
    log(info["text"])
    total = time.perf_counter() - t0
    log(f"demo done in {total:.1f} s (generating inputs {t_gen:.1f} s, merge {rep.seconds:.2f} s)")
    return {"folder": str(folder), "output": str(target), "seconds": total, "merge": rep.as_dict()}


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    res = run_demo(folder, n_models=args.models, factor=args.factor, log=(lambda *a: None) if args.json else say)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        say(f"the pool, its recipe and the merge stay in {folder}/ (the README's examples use them)")
    return 0


@command("synth")
def cmd_synth(args: argparse.Namespace) -> int:
    p = make_checkpoint(args.output, args.arch, factor=args.factor, seed=args.seed, dtype=args.dtype.upper(),
                        ema=args.ema, overwrite=args.overwrite)
    ck = Checkpoint(p)
    emit(args, {"output": str(p), "arch": args.arch, "tensors": len(ck), "bytes": ck.file_len},
         f"wrote {p}: synthetic {args.arch} ({len(ck)} tensors, {human_bytes(ck.file_len)}, dimensions / {args.factor})")
    return 0


def add_parsers(sub) -> None:
    m = sub.add_parser("merge", help="per-component N-way merge from a grid or TOML recipe, or a robust merge (.mecha)")
    m.add_argument("recipe", help="recipe file (grid notation, .toml, or an sd-mecha .mecha recipe)")
    m.add_argument("--models", required=True, help="folder with the _xNN-*.safetensors models")
    m.add_argument("--output", help="which output line of the recipe to build (default: the first)")
    m.add_argument("--base", help="model id (or file) for components no line selects, ints and other keys")
    m.add_argument("-o", help="output file (default: the recipe's output line, else the naming convention)")
    m.add_argument("--out-dir", help="folder for the output (default: the models folder)")
    m.add_argument("--dtype", default=None, help="f16 (default), bf16, f32")
    m.add_argument("--accumulate", default=None, choices=["f32", "f64"])
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    m.add_argument("--threads", type=thread_count)
    m.add_argument("--hash-inputs", action="store_true", help="record each input's sha256 (webui sd_merge_models)")
    add_cache_args(m)
    m.add_argument("--precision", choices=["f32", "f64"],
                   help="robust recipes: working precision (default f64, or the TOML recipe's; f32 is faster and "
                        "about sd-mecha's default float32)")
    m.add_argument("--vote", choices=["count", "mass"],
                   help=".mecha recipes: TIES sign rule for every node (default: each node's vote_sgn, as sd-mecha 1.1)")
    m.add_argument("--dry-run", action="store_true", help="print the resolved plan, write nothing")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--no-fsync", action="store_true")
    m.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="merge a pool of synthetic SDXL models from a grid recipe, then inspect")
    d.add_argument("folder", nargs="?", default="astolfomix-demo", help="where the pool goes (default: ./astolfomix-demo)")
    d.add_argument("--models", type=int, default=8)
    d.add_argument("--factor", type=int, default=16, help="shrink large dimensions by this (1 = full size)")
    d.add_argument("--json", action="store_true")

    y = sub.add_parser("synth", help="write one synthetic checkpoint (real key layout, shrunk dimensions) to try commands on")
    y.add_argument("output")
    y.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    y.add_argument("--factor", type=int, default=16, help="shrink large dimensions by this (1 = full size)")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    y.add_argument("--ema", action="store_true", help="include EMA weights")
    y.add_argument("--overwrite", action="store_true")
    y.add_argument("--json", action="store_true")
