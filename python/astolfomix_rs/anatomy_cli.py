"""CLI subcommands for anatomy: inspect, hash, export, import, compare."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .cli_common import command, emit, human_bytes

PROVENANCE_KEYS = ("astolfomix.merge", "astolfomix.inputs", "astolfomix.files", "astolfomix.import", "astolfomix.export")


def inspect_file(path, *, nan: bool = False, metric: bool = True, hashes: bool = True) -> dict:
    """Everything ``inspect`` shows about one file, plus its text."""
    from .anatomy import detect
    from .reader import Checkpoint
    from .toolkit import (
        component_hashes,
        escape,
        nonfinite,
        position_ids_report,
        toolkit_metric,
    )

    ck = Checkpoint(path)
    an = detect(ck)
    comps: dict[str, dict] = {}
    for n, c in an.components.items():
        comps[n] = {"kind": c.kind, "label": c.label, "prefix": c.prefix, "tensors": c.tensors, "params": c.params,
                    "bytes": c.bytes, "dtypes": c.dtypes, "missing": c.missing}
    info: dict = {
        "file": os.fspath(ck.path), "size": ck.file_len, "arch": an.arch, "variant": an.variant, "layout": an.layout,
        "tensors": len(ck), "components": comps, "junk": an.junk, "buffers": len(an.buffers), "ema_tensors": an.ema,
        "vpred_keys": an.vpred, "position_ids": position_ids_report(ck, an), "notes": an.notes,
    }
    if metric:
        info["toolkit"] = toolkit_metric(ck, an)
    if hashes:
        info["component_hashes"] = component_hashes(ck, an)
    if nan:
        info["nonfinite"] = {n: nonfinite(ck, c.keys) for n, c in an.components.items()}
    md = ck.metadata
    info["metadata"] = {escape(k, 80): escape(v) for k, v in md.items()}
    info["provenance"] = {k: md[k] for k in PROVENANCE_KEYS if k in md}
    lines = [f"{escape(os.fspath(ck.path))}: {an.arch}" + (f" ({an.variant})" if an.variant != "normal" else "")
             + (f", exported component, {an.layout} layout" if an.layout else "")
             + f", {len(ck)} tensors, {human_bytes(ck.file_len)}"]
    for n, cd in comps.items():
        dts = ", ".join(f"{d} x{k}" for d, k in cd["dtypes"].items())
        lines.append(f"  {n:5} {cd['label']}: {cd['tensors']} tensors, {cd['params'] / 1e6:.1f} M params, {human_bytes(cd['bytes'])} ({dts})")
        if cd["missing"]:
            lines.append(f"        MISSING {len(cd['missing'])} keys: " + ", ".join(cd["missing"][:5]) + (" ..." if len(cd["missing"]) > 5 else ""))
        if hashes:
            lines.append(f"        content hash {info['component_hashes'][n][:16]}")
    if metric:
        t = info["toolkit"]
        lines.append(f"  toolkit metric {t['metric']}" + (f"  ({'; '.join(t['names'])})" if t["names"] else ""))
    for n, st in info["position_ids"].items():
        if st != "ok":
            lines.append(f"  {n} position_ids: {st}" + (" (values not exactly 0..76)" if st == "broken" else ""))
    if an.ema:
        lines.append(f"  EMA: {an.ema} tensors")
    if an.vpred:
        lines.append(f"  v-prediction keys: {', '.join(an.vpred)}")
    if an.junk:
        lines.append(f"  junk keys ({len(an.junk)}): " + ", ".join(escape(k, 80) for k in an.junk[:5]) + (" ..." if len(an.junk) > 5 else ""))
    if nan:
        for n, v in info["nonfinite"].items():
            lines.append(f"  {n}: {v['nan']} NaN, {v['inf']} Inf")
    for note in an.notes:
        lines.append(f"  note: {note}")
    if md:
        lines.append(f"  metadata: {len(md)} keys")
        for k in ("modelspec.title", "modelspec.architecture", "sd_merge_recipe", "ss_base_model_version", "ss_output_name"):
            if k in md:
                lines.append(f"    {k}: {escape(md[k], 120)}")
    if "astolfomix.merge" in md:
        try:
            m = json.loads(md["astolfomix.merge"])
            lines.append(f"  made by {escape(str(m.get('tool')))}: " + ", ".join(f"{c} x{n}" for c, n in m.get("counts", {}).items())
                         + f", base {escape(str(m.get('base')))}, dtype {escape(str(m.get('dtype')))}")
        except (ValueError, AttributeError):
            lines.append("  astolfomix.merge: unreadable")
    info["text"] = "\n".join(lines)
    return info


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    infos = [inspect_file(f, nan=args.nan, metric=not args.no_metric) for f in args.files]
    if args.json:
        print(json.dumps([{k: v for k, v in i.items() if k != "text"} for i in infos], indent=2, default=str))
    else:
        print("\n\n".join(i["text"] for i in infos))
    return 0


@command("hash")
def cmd_hash(args: argparse.Namespace) -> int:
    from .anatomy import detect
    from .hashing import files_hashes
    from .reader import Checkpoint
    from .toolkit import component_hashes, toolkit_metric

    out, lines = [], []
    for f in args.files:
        ck = Checkpoint(f)  # opened once: every hash below reads this handle
        h = files_hashes([ck])[0]
        an = detect(ck)
        comp = component_hashes(ck, an)
        met = toolkit_metric(ck, an)
        out.append({"file": f, **h, "components": comp, "toolkit": met["metric"], "names": met["names"]})
        lines.append(f"{f}\n  AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  AutoV3 {h['autov3'][:12]}  sha256 {h['sha256']}\n"
                     f"  toolkit {met['metric']}" + (f" ({'; '.join(met['names'])})" if met["names"] else "")
                     + "".join(f"\n  {n:5} {v[:16]}" for n, v in comp.items()))
    emit(args, out, "\n".join(lines))
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from .cli_common import report_text
    from .toolkit import export

    r = export(args.file, args.component, args.output, layout=args.layout, dtype=args.dtype, overwrite=args.overwrite,
               progress=not args.json)
    emit(args, r.as_dict(), report_text(r))
    return 0


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    from .cli_common import report_text
    from .toolkit import import_component

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
    from .toolkit import compare, selection_line

    ref = None
    if args.reference:
        names = [Path(f).name for f in args.files]
        if args.reference not in args.files and Path(args.reference).name not in names:
            from .errors import PlanError

            raise PlanError(f"--reference {args.reference} is not one of the files")
        ref = args.files.index(args.reference) if args.reference in args.files else names.index(Path(args.reference).name)
    res = compare(args.files, distances=args.distance, reference=ref)
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


def add_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="architecture, components, missing/junk keys, metric, hashes, metadata")
    i.add_argument("files", nargs="+")
    i.add_argument("--nan", action="store_true", help="count NaN/Inf values (reads every tensor)")
    i.add_argument("--no-metric", action="store_true", help="skip the toolkit metric (reads the weights)")
    i.add_argument("--json", action="store_true")

    h = sub.add_parser("hash", help="AutoV1/V2/V3, component content hashes, toolkit metric")
    h.add_argument("files", nargs="+")
    h.add_argument("--json", action="store_true")

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
