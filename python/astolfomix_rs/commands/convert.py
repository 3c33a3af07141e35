"""``astolfomix convert``: what merge authors do to a download before merging, as one plan on
the engine: a dtype (fp32/fp16/bf16), pruning (EMA and junk keys), sound ``position_ids``, a
baked-in VAE; and pickled ``.ckpt`` files to safetensors without running their pickle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..core.ckpt import read_ckpt
from ..core.engine import execute
from ..core.plan import Output, Plan, parse_dtype
from ..core.reader import Checkpoint
from ..core.report import Report
from ..core.save import save
from ..errors import ArchitectureError, InvalidFileError, PlanError
from ..models.anatomy import canonical_name, detect
from ..models.registry import EMA
from .components import _source_component


@dataclass
class ConvertResult:
    report: Report
    pruned: list[str] = field(default_factory=list)
    position_ids: dict[str, str] = field(default_factory=dict)
    vae_from: str | None = None
    skipped: list[str] = field(default_factory=list)  # .ckpt entries that were not tensors

    def as_dict(self) -> dict[str, Any]:
        return {"report": self.report.as_dict(), "pruned": len(self.pruned), "position_ids": self.position_ids,
                "vae_from": self.vae_from, "skipped": self.skipped}


def convert_plan(ck: Checkpoint, *, dtype: str | None = None, prune: bool = False, fix_position_ids: bool = False,
                 vae: Checkpoint | None = None, source_name: str | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan: every kept tensor copied (floats converted to ``dtype``), ``position_ids``
    rewritten as int64 0..76 where asked, the VAE's tensors taken from ``vae`` (checked key by
    key and shape by shape first). Returns (plan, notes)."""
    out_dtype = parse_dtype(dtype) if dtype else None
    an = detect(ck)
    pruned = [k for k in ck.keys() if prune and (k.startswith(EMA) or k in an.junk)]
    drop = set(pruned)
    vae_src: dict[str, str] = {}
    if vae is not None:
        tc = an.components.get("vae")
        if tc is None:
            raise ArchitectureError(f"{ck.path}: has no VAE to replace")
        sc = _source_component(vae, "vae", "vae")
        by_name = {canonical_name(sc, k): k for k in sc.keys}
        problems = []
        for k in tc.keys:
            s = by_name.get(canonical_name(tc, k))
            if s is None:
                problems.append(f"'{canonical_name(tc, k)}' is missing from {Path(vae.path).name}")
            elif vae.info[s].shape != ck.info[k].shape:
                problems.append(f"'{k}': {list(vae.info[s].shape)} in {Path(vae.path).name} but {list(ck.info[k].shape)}")
            else:
                vae_src[k] = s
        if problems:
            raise ArchitectureError(f"cannot bake the VAE ({len(problems)} problems, nothing written):\n  "
                                    + "\n  ".join(problems[:30]))
    fixed: dict[str, str] = {}
    pid_keys = {}
    if fix_position_ids:
        for n, c in an.components.items():
            if c.kind == "clip_l":
                inner = "text_model." if c.prefix.endswith("transformer.") else ""
                key = next((k for k in c.keys if k.endswith("position_ids")), c.prefix + inner + "embeddings.position_ids")
                pid_keys[key] = n
    outputs: list[Output] = []
    for k, t in ck.info.items():
        if k in drop:
            continue
        if k in pid_keys:
            ok = t.dtype == "I64" and t.shape == (1, 77) and np.array_equal(ck.tensor(k).ravel(), np.arange(77))
            fixed[pid_keys[k]] = "ok" if ok else "rewritten as int64 0..76"
            outputs.append(Output(k, "copy", [(0, k)]) if ok else
                           Output.constant(k, "I64", (1, 77), np.arange(77, dtype="<i8")))
            continue
        if k in vae_src:
            outputs.append(Output(k, "copy", [(1, vae_src[k])], out_dtype or t.dtype))
            continue
        outputs.append(Output(k, "copy", [(0, k)], out_dtype if t.is_float else None))
    for key, n in pid_keys.items():
        if key not in ck.info:
            fixed[n] = "added as int64 0..76"
            outputs.append(Output.constant(key, "I64", (1, 77), np.arange(77, dtype="<i8")))
    if not outputs:
        raise PlanError(f"{ck.path}: nothing left to write")
    meta = dict(ck.metadata)
    meta.pop("astolfomix.from_pickle", None)
    meta["astolfomix.convert"] = json.dumps({"from": source_name or Path(ck.path).name, "dtype": out_dtype or "same", "pruned": len(pruned),
                                             "position_ids": fixed, "vae": Path(vae.path).name if vae else None})
    inputs: list[Path | Checkpoint] = [ck]
    if vae is not None:
        inputs.append(vae)
    return Plan(inputs, outputs, metadata=meta), {"pruned": pruned, "position_ids": fixed}


def convert(path: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str | None = None,
            prune: bool = False, fix_position_ids: bool = False, bake_vae: str | os.PathLike[str] | None = None,
            overwrite: bool = False, progress: bool = False) -> ConvertResult:
    """Converts one checkpoint (safetensors, or a pickled ``.ckpt`` read without running it)."""
    output = Path(output)
    skipped: list[str] = []
    tmp = None
    src = Path(path)
    if not src.is_file():
        raise PlanError(f"{src}: no such file")
    try:
        try:
            ck = Checkpoint(src)
        except InvalidFileError:
            # Not safetensors: a torch pickle (zip or bare) is read without running it. A
            # safetensors header length may start with 0x80 too, so the magic is only consulted
            # once the file has failed to open.
            with open(src, "rb") as f:
                head = f.read(2)
            if head != b"PK" and head[:1] != b"\x80":
                raise
            pk = read_ckpt(src)
            skipped = pk.skipped
            if not pk.tensors:
                raise PlanError(f"{src}: no tensors in its state dict")
            # The pickle's tensors as they are (mapped, not read), saved beside the output; the
            # conversion below is then the same plan as for any safetensors input.
            tmp = _core.temp_path(output)
            save(tmp, pk.tensors, {"astolfomix.from_pickle": src.name}, durable=False)
            ck = Checkpoint(tmp)
        vae = Checkpoint(bake_vae) if bake_vae else None
        plan, notes = convert_plan(ck, dtype=dtype, prune=prune, fix_position_ids=fix_position_ids, vae=vae,
                                   source_name=Path(path).name)
        rep = execute(plan, output, overwrite=overwrite, progress=progress)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return ConvertResult(rep, notes["pruned"], notes["position_ids"], Path(bake_vae).name if bake_vae else None, skipped)
