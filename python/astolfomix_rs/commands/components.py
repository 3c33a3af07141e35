"""Model-toolkit-style tools over the anatomy: the ``UUUU/VVVV/CCCC`` metric, component content
hashes, export and import of components (as plans run by the engine), and compare."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..core.engine import execute
from ..core.plan import Output, Plan, parse_dtype
from ..core.reader import Checkpoint
from ..core.report import Report
from ..core.save import save_text
from ..errors import ArchitectureError, OutputError, PlanError
from ..models.anatomy import (
    ALIASES,
    Anatomy,
    Component,
    canonical_name,
    detect,
    position_ids_status,
)
from ..models.registry import KNOWN, REFS, VIT_L_CONFIG

# ---------------------------------------------------------------------------------------------
# The toolkit metric

def metric_field(s: float, ref: tuple[float, int] | None) -> str:
    """The toolkit's formula: ``int(abs(S / B - 1) * K)``, folded below 10000, ``----`` for S == 0."""
    if s == 0 or ref is None:
        return "----"
    if not np.isfinite(s):
        return "NaN!"  # the weights hold NaN or Inf: the toolkit would crash here
    b, k = ref
    n = int(abs(s / b - 1) * k)
    while n >= 10000:
        n -= 5000
    return f"{n:04d}"


def clip_metric_keys(c: Component) -> list[str]:
    return [k for k in c.keys if "mlp." in k and ".23." not in k]


def vae_metric_keys(c: Component) -> list[str]:
    return [k for k in c.keys if "encoder." in k or "decoder." in k]


def toolkit_metric(ck: Checkpoint, an: Anatomy) -> dict[str, Any]:
    """``UUUU/VVVV/CCCC`` as the toolkit computes it for SD1/SD2; for SDXL the CLIP field reads TE0
    against the ViT-L reference and the VAE against the SD VAE (the toolkit prints ``----``)."""
    def total(keys: list[str]) -> float:
        return float(sum(_core.sigmoid_sums(ck._core, keys))) if keys else 0.0

    fields = {"unet": "----", "vae": "----", "clip": "----"}
    sums = {}
    unet = an.components.get("unet")
    if unet is not None and unet.kind in ("unet-sd1", "unet-sd2"):
        sums["unet"] = total(unet.keys)
        fields["unet"] = metric_field(sums["unet"], REFS["unet"])
    vae = an.components.get("vae")
    if vae is not None:
        sums["vae"] = total(vae_metric_keys(vae))
        fields["vae"] = metric_field(sums["vae"], REFS["vae"])
    te = an.components.get("te0") or an.components.get("te")
    if te is not None and te.kind in ("clip_l", "vit_h"):
        sums["clip"] = total(clip_metric_keys(te))
        fields["clip"] = metric_field(sums["clip"], REFS[te.kind])
    names = []
    for f in ("vae", "clip"):
        if not fields[f].isdigit():
            continue
        v = int(fields[f])
        for known, label in KNOWN[f].items():
            if abs(v - known) <= 1:
                names.append(f"uses the {label} {'VAE' if f == 'vae' else 'CLIP'}")
    return {"metric": f"{fields['unet']}/{fields['vae']}/{fields['clip']}", "fields": fields, "sums": sums, "names": names}


# ---------------------------------------------------------------------------------------------
# Content hashes


def hash_entries(c: Component) -> list[tuple[str, str]]:
    # position_ids is a buffer that files keep or drop: it is not part of the weights' identity.
    return [(canonical_name(c, k), k) for k in c.keys if not k.endswith("position_ids")]


def component_hashes(ck: Checkpoint, an: Anatomy, progress=None) -> dict[str, str]:
    groups = {n: hash_entries(c) for n, c in an.components.items()}
    return dict(_core.content_hashes(ck._core, groups, progress))


# ---------------------------------------------------------------------------------------------
# Export / import

def _ema_map(ck: Checkpoint, an: Anatomy) -> dict[str, str]:
    """EMA keys (``model_ema.`` + the UNET key without dots) -> UNET key names without prefix."""
    unet = an.components.get("unet")
    if unet is None:
        raise ArchitectureError(f"{ck.path}: no UNET to name the EMA weights after")
    by_flat = {k[len("model."):].replace(".", ""): k[len(unet.prefix):] for k in unet.keys}
    out = {}
    for k in ck.keys():
        if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates"):
            flat = k[len("model_ema."):]
            if flat in by_flat:
                out[k] = by_flat[flat]
    if not out:
        raise ArchitectureError(f"{ck.path}: no EMA weights (model_ema.*) in this file")
    return out


def export_plan(ck: Checkpoint, component: str, *, layout: str = "toolkit", dtype: str | None = "f16") -> Plan:
    """The plan that writes one component to its own file: ``toolkit`` layout (whole prefix
    stripped, as the webui toolkit exports) or ``transformers`` (``text_model.*`` keys of
    CLIPTextModel, ViT-L only)."""
    an = detect(ck)
    out_dtype = parse_dtype(dtype)
    component = ALIASES.get(component, component)
    if component == "ema":
        mapping = _ema_map(ck, an)
        outputs = [Output(new, "copy", [(0, k)], out_dtype if ck.info[k].is_float else None) for k, new in mapping.items()]
        return Plan([ck], outputs, metadata={"astolfomix.export": "ema"})
    c = an.component(component)
    if layout == "transformers" and c.kind != "clip_l":
        raise ArchitectureError(f"the transformers layout is for the ViT-L CLIP (te0 / SD1 te), not {c.label}")
    outputs = []
    for k in c.keys:
        name = canonical_name(c, k)
        if layout == "transformers":
            name = "text_model." + name
        t = ck.info[k]
        if name.endswith("position_ids") and (t.is_float or layout == "transformers"):
            continue  # written below as int64 from the right values
        outputs.append(Output(name, "copy", [(0, k)], out_dtype if t.is_float else None))
    meta = {"astolfomix.export": json.dumps({"component": component, "kind": c.kind, "layout": layout, "from": Path(ck.path).name})}
    return Plan([ck], outputs, metadata=meta, notes={"component": c})


def export(path, component: str, output, *, layout: str = "toolkit", dtype: str | None = "f16",
           overwrite: bool = False, progress: bool = False):
    """Exports ``component`` of ``path``. With ``layout="transformers"``, ``output`` is a folder
    holding ``config.json`` and ``model.safetensors`` that ``CLIPTextModel.from_pretrained`` loads."""

    ck = Checkpoint(path)
    plan = export_plan(ck, component, layout=layout, dtype=dtype)
    if layout == "transformers":
        return _export_folder(plan, Path(output), overwrite, progress)
    return execute(plan, output, overwrite=overwrite, progress=progress)


def _export_folder(plan: Plan, folder: Path, overwrite: bool, progress: bool) -> Report:
    """A transformers folder (``model.safetensors`` + ``config.json``), written whole or not at
    all: a new folder is filled under a temp name beside it and renamed into place; in an existing
    folder both files are checked first and the weights are removed again if the config fails."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    if folder.is_dir():
        for f in ("config.json", "model.safetensors"):
            if (folder / f).exists() and not overwrite:
                raise OutputError(f"{folder / f}: already exists (pass overwrite=True / --overwrite)")
        had_model = (folder / "model.safetensors").exists()
        rep = execute(plan, folder / "model.safetensors", overwrite=overwrite, progress=progress)
        try:
            save_text(folder / "config.json", _transformers_config(folder / "model.safetensors"), overwrite)
        except BaseException:
            if not had_model:
                (folder / "model.safetensors").unlink(missing_ok=True)
            raise
        return rep
    if not folder.parent.is_dir():
        raise OutputError(f"{folder}: folder {folder.parent} does not exist")
    tmp = _core.temp_path(folder)
    tmp.mkdir()
    try:
        rep = execute(plan, tmp / "model.safetensors", progress=progress)
        save_text(tmp / "config.json", _transformers_config(tmp / "model.safetensors"), False)
        try:
            os.rename(tmp, folder)  # fails if a non-empty folder appeared there meanwhile
        except OSError as e:
            raise OutputError(f"{folder}: was created by something else while this ran ({e.strerror}); not replaced") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    rep.output = folder / "model.safetensors"
    return rep


def _transformers_config(weights: Path) -> str:
    # The dtype transformers loads the weights in: the one they were written in.
    written = Checkpoint(weights)
    first = next((i.dtype for i in written.info.values() if i.is_float), "F32")
    torch_dtype = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(first, "float32")
    return json.dumps({**VIT_L_CONFIG, "torch_dtype": torch_dtype}, indent=2) + "\n"


def _source_component(ck: Checkpoint, want_kind: str, slot: str) -> Component:
    an = detect(ck)
    for c in an.components.values():
        if c.kind == want_kind:
            return c
    have = ", ".join(f"{n} ({c.label})" for n, c in an.components.items()) or "nothing recognised"
    raise ArchitectureError(f"{ck.path}: has no {slot} of the kind the target needs ({want_kind}); it has {have}")


@dataclass
class ImportResult:
    report: Report
    replaced: int
    position_ids: str
    ignored: list[str]


def import_component(target, source, component: str, output=None, *, in_place: bool = False,
                     overwrite: bool = False, progress: bool = False, dtype: str | None = None) -> ImportResult:
    """Writes ``target`` with its ``component`` replaced by the matching component of ``source``
    (a full checkpoint or an exported file of any layout). Every key and shape is checked before
    anything is written; ``position_ids`` are copied if sound, else written as int64 0..76."""

    tck, sck = Checkpoint(target), Checkpoint(source)
    tan = detect(tck)
    component = ALIASES.get(component, component)
    tc = tan.component(component)
    sc = _source_component(sck, tc.kind, component)
    src_by_name = {canonical_name(sc, k): k for k in sc.keys}
    problems, outputs = [], []
    pid_status = "n/a"
    want = {canonical_name(tc, k): k for k in tc.keys}
    if tc.kind == "clip_l":
        inner = "text_model." if tc.prefix.endswith("transformer.") else ""
        want.setdefault("embeddings.position_ids", tc.prefix + inner + "embeddings.position_ids")
    for name, tkey in want.items():
        skey = src_by_name.get(name)
        if name.endswith("position_ids"):
            continue
        if skey is None:
            problems.append(f"'{name}' is missing from {Path(sck.path).name}")
        elif sck.info[skey].shape != tck.info[tkey].shape:
            have, want_shape = list(sck.info[skey].shape), list(tck.info[tkey].shape)
            problems.append(f"'{name}': {have} in {Path(sck.path).name} but {want_shape} in {Path(tck.path).name}")
    if problems:
        raise ArchitectureError(f"cannot import {component} ({len(problems)} problems, nothing written):\n  " + "\n  ".join(problems[:30]))
    ignored = sorted(set(src_by_name) - set(want))
    out_dtype = parse_dtype(dtype) if dtype else None
    comp_keys = set(tc.keys) | {want.get("embeddings.position_ids")}
    component_outputs: list[Output] = []
    for name, tkey in want.items():
        if name.endswith("position_ids"):
            skey = src_by_name.get(name)
            pid_status = position_ids_status(sck, skey) if skey else "missing"
            if pid_status == "ok":
                component_outputs.append(Output(tkey, "copy", [(1, skey)], None))
            else:
                # Sound int64 0..76, carried by the plan itself.
                component_outputs.append(Output.constant(tkey, "I64", (1, 77), np.arange(77, dtype="<i8")))
            continue
        skey = src_by_name[name]
        component_outputs.append(Output(tkey, "copy", [(1, skey)], out_dtype if sck.info[skey].is_float else None))
    # The target's key order, with the new component where the old one was.
    for k in tck.info:
        if k not in comp_keys:
            outputs.append(Output(k, "copy", [(0, k)], None))
        elif component_outputs:
            outputs.extend(component_outputs)
            component_outputs = []
    outputs.extend(component_outputs)
    meta = dict(tck.metadata)
    meta["astolfomix.import"] = json.dumps({"component": component, "from": Path(sck.path).name, "into": Path(tck.path).name,
                                            "position_ids": pid_status})
    plan = Plan([tck, sck], outputs, metadata=meta)
    if in_place:
        rep = execute(plan, target, in_place=0, progress=progress)
    else:
        if output is None:
            raise PlanError("import needs an output file (or in_place=True)")
        rep = execute(plan, output, overwrite=overwrite, progress=progress)
    return ImportResult(rep, len(want), pid_status, ignored)


__all__ = ["component_hashes", "export", "export_plan", "import_component", "toolkit_metric"]
