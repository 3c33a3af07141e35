"""CLI subcommands for anatomy: inspect, hash, export, import, compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import _core
from ..commands.components import export, import_component
from ..commands.convert import convert
from ..commands.hashing import pool_hashes
from ..commands.inspect import inspect_file
from ..commands.pool import compare, init_pool, list_pool, selection_line
from ..commands.recipe import POOL_TABLE
from ..core.reader import Checkpoint
from ..errors import PlanError
from .common import add_cache_args, cache_from, command, emit, human_bytes, report_text, say


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    cache = cache_from(args)
    infos = []
    for f in args.files:
        ck = Checkpoint(f)  # opened once: the hashes below read this handle
        # Header-only by default; content hashes and the metric when cached or asked for (--hashes).
        known = (pool_hashes([f], want=("content", "toolkit"), cache=cache, progress=not args.json, opened={0: ck})[0]
                 if args.hashes else cache.get(f))
        infos.append(inspect_file(ck, nan=args.nan, metric=not args.no_metric, known=known, compute=False,
                                  progress=not args.json))
    if args.json:
        print(json.dumps([{k: v for k, v in i.items() if k != "text"} for i in infos], indent=2, default=str))
    else:
        say("\n\n".join(i["text"] for i in infos))
    return 0


@command("hash")
def cmd_hash(args: argparse.Namespace) -> int:
    res = pool_hashes(args.files, cache=cache_from(args), progress=not args.json)
    out, lines = [], []
    for f, h in zip(args.files, res):
        met, comp = h["toolkit"], h["components"]
        out.append({"file": f, **{k: h[k] for k in ("sha256", "autov1", "autov2", "autov3")}, "components": comp,
                    "toolkit": met["metric"], "names": met["names"]})
        lines.append(f"{f}\n  AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  AutoV3 {h['autov3'][:12]}  sha256 {h['sha256']}\n"
                     f"  toolkit {met['metric']}" + (f" ({'; '.join(met['names'])})" if met["names"] else "")
                     + "".join(f"\n  {n:5} {v[:16]}" for n, v in comp.items()))
    emit(args, out, "\n".join(lines))
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:

    r = export(args.file, args.component, args.output, layout=args.layout, dtype=args.dtype, overwrite=args.overwrite,
               progress=not args.json)
    emit(args, r.as_dict(), report_text(r))
    return 0


@command("import")
def cmd_import(args: argparse.Namespace) -> int:

    r = import_component(args.target, args.source, args.component, args.output, in_place=args.in_place,
                         overwrite=args.overwrite, progress=not args.json)
    text = report_text(r.report) + f"\nreplaced {r.replaced} {args.component} tensors; position_ids: {r.position_ids}"
    if r.position_ids not in ("ok", "n/a"):
        text += " (written as int64 0..76)"
    if r.ignored:
        text += f"\nignored {len(r.ignored)} source keys the target does not have: {', '.join(r.ignored[:5])}"
    emit(args, {"report": r.report.as_dict(), "replaced": r.replaced, "position_ids": r.position_ids, "ignored": r.ignored}, text)
    return 0


@command("compare")
def cmd_compare(args: argparse.Namespace) -> int:

    ref = None
    if args.reference:
        names = [Path(f).name for f in args.files]
        if args.reference not in args.files and Path(args.reference).name not in names:

            raise PlanError(f"--reference {args.reference} is not one of the files")
        ref = args.files.index(args.reference) if args.reference in args.files else names.index(Path(args.reference).name)
    res = compare(args.files, distances=args.distance, reference=ref, cache=cache_from(args), progress=not args.json)
    lines = []
    for n, c in res["components"].items():
        lines.append(f"{n}: {len(c['groups'])} distinct" + (f" (missing from {len(c['missing_from'])})" if c["missing_from"] else ""))
        for g in c["groups"]:
            if len(g["files"]) > 1 or len(c["groups"]) <= 8:
                lines.append(f"  {g['hash']}  x{len(g['files'])}: " + ", ".join(Path(f).name for f in g["files"][:12])
                             + (" ..." if len(g["files"]) > 12 else ""))
        if "relative_l2" in c:
            lines.append(f"  relative L2 to {Path(c['relative_to']).name if c['relative_to'] != 'mean' else 'the mean'}:")
            for f, d in c["relative_l2"].items():
                lines.append(f"    {d:.6f}  {Path(f).name}")
    if args.select:
        comp, _, same = args.select.partition("=")
        line = selection_line(res, comp, same)
        res["selection"] = line
        lines.append(line)
    emit(args, res, "\n".join(lines))
    return 0


@command("clean")
def cmd_clean(args: argparse.Namespace) -> int:
    removed = []
    for d in args.folders:
        if not Path(d).is_dir():
            raise PlanError(f"{d}: not a folder")
        removed += _core.clean_stale(d)
    total = sum(n for _, n in removed)
    text = "\n".join(f"removed {p} ({human_bytes(n)})" for p, n in removed)
    text += ("\n" if text else "") + f"{len(removed)} leftover temp files of stopped runs removed, {human_bytes(total)} freed"
    forgot = None
    if args.cache_entries:
        from ..commands.hashcache import HashCache

        forgot = HashCache(args.cache).prune()
        text += f"\n{forgot} hash cache entries of files that are gone or changed forgotten"
    emit(args, {"removed": [{"path": str(p), "bytes": n} for p, n in removed], "bytes": total,
                "cache_entries_forgotten": forgot}, text)
    return 0


@command("convert")
def cmd_convert(args: argparse.Namespace) -> int:
    r = convert(args.file, args.output, dtype=args.dtype, prune=args.prune, fix_position_ids=args.fix_position_ids,
                bake_vae=args.bake_vae, overwrite=args.overwrite, progress=not args.json)
    text = report_text(r.report)
    if r.pruned:
        text += f"\npruned {len(r.pruned)} keys (EMA and junk)"
    for n, st in r.position_ids.items():
        text += f"\n{n} position_ids: {st}"
    if r.vae_from:
        text += f"\nVAE from {r.vae_from}"
    if r.skipped:
        text += f"\nleft out {len(r.skipped)} non-tensor entries of the pickle: {', '.join(r.skipped[:8])}"
    emit(args, r.as_dict(), text)
    return 0


@command("pool")
def cmd_pool(args: argparse.Namespace) -> int:
    if args.pool_command == "init":
        rows = init_pool(args.folder, rename=args.rename, dry_run=args.dry_run)
        new = [r for r in rows if r["action"] != "kept"]
        how = "would be " if args.dry_run else ""
        lines = [f"  {r['id']:>4}  {r['file']}" + ("" if r["action"] == "kept" else f"  ({how}{r['action']})") for r in rows]
        where = "renamed" if args.rename else f"recorded in {Path(args.folder) / POOL_TABLE}"
        lines.append(f"{len(rows)} models, {len(new)} newly numbered" + (f" ({how}{where})" if new else ""))
        emit(args, {"models": rows, "dry_run": args.dry_run}, "\n".join(lines))
        return 0
    res = list_pool(args.folder, cache=cache_from(args), compute=args.hash, progress=not args.json)
    lines = [f"{'id':>4}  {'arch':12} {'size':>9}  {'dtype':5} {'AutoV2':10}  file"]
    for r in res["models"]:
        dup = f"  ({r['duplicates']} more files with this id)" if r["duplicates"] else ""
        lines.append(f"{r['id']:>4}  {r['arch']:12} {human_bytes(r['size']):>9}  {r['dtype']:5} {r['autov2'] or '-':10}  {r['file']}{dup}")
    for comp, groups in res["identical"].items():
        for g in groups:
            lines.append(f"identical {comp}: {', '.join(g)}")
    if res["hashed"] < res["count"]:
        lines.append(f"{res['count'] - res['hashed']} of {res['count']} models not hashed yet: "
                     "`astolfomix pool list --hash` (or `astolfomix hash`) fills the cache")
    emit(args, res, "\n".join(lines))
    return 0


def add_parsers(sub) -> None:
    cv = sub.add_parser("convert", help="dtype, pruning, position_ids, baked VAE; .ckpt to safetensors (pickle not run)")
    cv.add_argument("file", help="a .safetensors file, or a pickled .ckpt/.pt (read without running it)")
    cv.add_argument("output")
    cv.add_argument("--dtype", help="f16, bf16, f32 (default: keep each tensor's)")
    cv.add_argument("--prune", action="store_true", help="drop EMA weights and junk keys")
    cv.add_argument("--fix-position-ids", action="store_true", help="write the text encoders' position_ids as int64 0..76")
    cv.add_argument("--bake-vae", metavar="FILE", help="replace the VAE with FILE's (a checkpoint or an exported VAE)")
    cv.add_argument("--overwrite", action="store_true")
    cv.add_argument("--json", action="store_true")

    pl = sub.add_parser("pool", help="number a folder of downloads (_xNN-) and list what is in it")
    psub = pl.add_subparsers(dest="pool_command", required=True)
    pi = psub.add_parser("init", help="give every model of FOLDER an id, keeping the ones it has")
    pi.add_argument("folder")
    pi.add_argument("--rename", action="store_true", help="rename new files _xNN-NAME (default: record ids in "
                    + "astolfomix-pool.toml, files untouched)")
    pi.add_argument("--dry-run", action="store_true")
    pi.add_argument("--json", action="store_true")
    pls = psub.add_parser("list", help="id, architecture, size, dtype, AutoV2 and shared text encoders")
    pls.add_argument("folder")
    pls.add_argument("--hash", action="store_true", help="hash models the cache does not know yet (reads them)")
    pls.add_argument("--json", action="store_true")
    add_cache_args(pls)

    k = sub.add_parser("clean", help="remove temp files left in folders by runs that were killed")
    k.add_argument("folders", nargs="*")
    k.add_argument("--cache-entries", action="store_true",
                   help="also forget hash cache entries of files that are gone or changed")
    k.add_argument("--cache", metavar="FILE", help="the hash cache (default: $ASTOLFOMIX_CACHE or ~/.cache/astolfomix/hashes.json)")
    k.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="architecture, components, missing/junk keys, metric, hashes, metadata")
    i.add_argument("files", nargs="+")
    i.add_argument("--nan", action="store_true", help="count NaN/Inf values (reads every tensor)")
    i.add_argument("--hashes", action="store_true",
                   help="compute content hashes and the toolkit metric (reads the weights; cached after)")
    i.add_argument("--no-metric", action="store_true", help="do not show the toolkit metric")
    i.add_argument("--json", action="store_true")
    add_cache_args(i)

    h = sub.add_parser("hash", help="AutoV1/V2/V3, component content hashes, toolkit metric")
    h.add_argument("files", nargs="+")
    h.add_argument("--json", action="store_true")
    add_cache_args(h)

    e = sub.add_parser("export", help="write one component (unet, te0/clip, te1, vae, ema) to its own file")
    e.add_argument("file")
    e.add_argument("component")
    e.add_argument("output", help="output file (a folder with --layout transformers)")
    e.add_argument("--layout", default="toolkit", choices=["toolkit", "transformers"])
    e.add_argument("--dtype", default="f16", help="f16 (default), bf16, f32 or same")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--json", action="store_true")

    m = sub.add_parser("import", help="replace a component of TARGET with SOURCE's (checked first)")
    m.add_argument("target")
    m.add_argument("source", help="full checkpoint or exported component (any layout)")
    m.add_argument("component", help="unet, te0 (= SD1 te / clip), te1, vae")
    m.add_argument("output", nargs="?", help="new file to write (or --in-place)")
    m.add_argument("--in-place", action="store_true", help="replace TARGET atomically")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--json", action="store_true")

    c = sub.add_parser("compare", help="which models share identical components; L2 distances")
    c.add_argument("files", nargs="+")
    c.add_argument("--distance", action="store_true", help="relative L2 of each component to the reference or the mean")
    c.add_argument("--reference", help="one of the files (default: the mean)")
    c.add_argument("--select", metavar="COMP=FILE", help="print a recipe line of the models whose COMP equals FILE's")
    c.add_argument("--json", action="store_true")
    add_cache_args(c)
