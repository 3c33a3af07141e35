"""What ``inspect`` shows about a file: anatomy, hashes, the toolkit metric, position_ids, NaN
counts, metadata (escaped: it comes from strangers) and provenance."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from ..core.reader import Checkpoint
from ..core.report import Meter, escape
from ..models.anatomy import Anatomy, detect, position_ids_status
from .components import component_hashes, toolkit_metric


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def nonfinite(ck: Checkpoint, keys: Sequence[str], meter: Meter | None = None) -> dict[str, int]:
    nan = inf = 0
    for k in keys:
        t = ck.info[k]
        if not t.is_float:
            continue
        v = ck.tensor(k)
        nan += int(np.isnan(v).sum())
        inf += int(np.isinf(v).sum())
        if meter is not None:
            meter.advance(t.nbytes)
    return {"nan": nan, "inf": inf}


def position_ids_report(ck: Checkpoint, an: Anatomy) -> dict[str, str]:
    out = {}
    for n, c in an.components.items():
        if c.kind != "clip_l":
            continue
        key = next((k for k in c.keys if k.endswith("position_ids")), None)
        if key is None:
            out[n] = "missing"
        else:
            out[n] = position_ids_status(ck, key)
    return out



PROVENANCE_KEYS = ("astolfomix.merge", "astolfomix.inputs", "astolfomix.files", "astolfomix.import", "astolfomix.export")


def inspect_file(path, *, nan: bool = False, metric: bool = True, hashes: bool = True,
                 known: dict | None = None, compute: bool = True, progress: bool = False) -> dict:
    """Everything ``inspect`` shows about one file, plus its text. ``known``: hashes already at
    hand (from the hash cache); with ``compute=False`` the metric and content hashes are shown
    only when known (the header alone answers everything else). ``path`` may be a checkpoint
    already open."""
    known = known or {}

    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
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
    if metric and "toolkit" in known:
        info["toolkit"] = known["toolkit"]
    elif metric and compute:
        info["toolkit"] = toolkit_metric(ck, an)
    if hashes and "components" in known:
        info["component_hashes"] = known["components"]
    elif hashes and compute:
        info["component_hashes"] = component_hashes(ck, an)
    if nan:  # reads every weight: a byte bar on a terminal
        total = sum(ck.info[k].nbytes for c in an.components.values() for k in c.keys if ck.info[k].is_float)
        meter = Meter(total, "NaN/Inf scan", enabled=progress and bool(total))
        try:
            info["nonfinite"] = {n: nonfinite(ck, c.keys, meter) for n, c in an.components.items()}
        finally:
            meter.close()
    md = ck.metadata
    info["metadata"] = {escape(k, 80): escape(v) for k, v in md.items()}
    info["provenance"] = {k: md[k] for k in PROVENANCE_KEYS if k in md}
    info["text"] = _inspect_text(info, ck, an, md, nan=nan, metric="toolkit" in info, hashes="component_hashes" in info)
    return info


def _inspect_text(info: dict, ck: Checkpoint, an: Anatomy, md: dict[str, str], *, nan: bool, metric: bool,
                  hashes: bool) -> str:
    comps = info["components"]
    lines = [f"{escape(os.fspath(ck.path))}: {an.arch}" + (f" ({an.variant})" if an.variant != "normal" else "")
             + (f", exported component, {an.layout} layout" if an.layout else "")
             + f", {len(ck)} tensors, {human_bytes(ck.file_len)}"]
    for n, cd in comps.items():
        dts = ", ".join(f"{d} x{k}" for d, k in cd["dtypes"].items())
        lines.append(f"  {n:5} {cd['label']}: {cd['tensors']} tensors, {cd['params'] / 1e6:.1f} M params, {human_bytes(cd['bytes'])} ({dts})")
        if cd["missing"]:
            lines.append(f"        MISSING {len(cd['missing'])} keys: " + ", ".join(cd["missing"][:5]) + (" ..." if len(cd["missing"]) > 5 else ""))
        if hashes and n in info["component_hashes"]:
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
    return "\n".join(lines)


