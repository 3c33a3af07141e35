"""Checkpoint anatomy: which architecture a file is, which components it holds (prefix, kind,
keys), what is missing or junk. The reference key tables ship in ``data/`` (taken from real SD1
and SDXL checkpoints); SD2's OpenCLIP ViT-H table is generated from its known structure."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..core.reader import Checkpoint
from ..errors import ArchitectureError
from .registry import (  # noqa: F401  (re-exported: the architecture names live in registry)
    ALIASES,
    ARCHES,
    EMA,
    KIND_LABEL,
    REFINER_TE,
    SCHEDULER_KEYS,
    SD1_TE,
    SD2_TE,
    UNET,
    VAE,
    VARIANTS,
    VPRED_KEYS,
    XL_TE0,
    XL_TE1,
    reference,
)


@dataclass
class Component:
    name: str  # unet, te, te0, te1, vae
    kind: str  # clip_l, bigg, vit_h, vae, unet-*
    prefix: str
    keys: list[str]
    missing: list[str] = field(default_factory=list)
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return KIND_LABEL.get(self.kind, self.kind)


@dataclass
class Anatomy:
    path: str
    arch: str  # sd1, sd2, sdxl, sdxl-refiner, component, unknown
    variant: str = "normal"
    components: dict[str, Component] = field(default_factory=dict)
    junk: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    ema: int = 0
    vpred: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: for an exported component file: "toolkit", "transformers", or "prefixed"
    layout: str | None = None

    def component(self, name: str) -> Component:
        name = ALIASES.get(name, name)
        if name in self.components:
            return self.components[name]
        if name == "te" and self.arch == "sdxl":
            raise ArchitectureError(f"{self.path}: SDXL has two text encoders; say te0 (ViT-L) or te1 (bigG)")
        if name == "te0" and self.arch in ("sd1",):
            return self.components["te"]
        have = ", ".join(self.components) or "none"
        raise ArchitectureError(f"{self.path}: no {name} component in this {self.arch} file (it has: {have})")

    def component_of(self, key: str) -> str | None:
        """The component a key belongs to, or None (buffers, EMA, junk)."""
        for c in self.components.values():
            if c.prefix and key.startswith(c.prefix):
                return c.name
            if not c.prefix and key in c.keys:
                return c.name
        return None


def _strip_tm(kind: str, name: str) -> str:
    return name[len("text_model."):] if kind == "clip_l" and name.startswith("text_model.") else name


def canonical_name(c: Component, key: str) -> str:
    """A component key without its prefix (and ``text_model.`` for the ViT-L CLIP), so the same
    weights have the same names in SD1, SDXL, toolkit and transformers layouts."""
    return _strip_tm(c.kind, key[len(c.prefix):])


def _blocks(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _exported(keys: list[str]) -> tuple[str, str, str, str] | None:
    """(name, kind, prefix, layout) of a file holding one exported component, or None."""
    ks = set(keys)
    if any(k.startswith("text_model.") for k in ks):
        return "te0", "clip_l", "text_model.", "transformers"
    if any(k.startswith("encoder.layers.") for k in ks) and any(k.startswith("embeddings.") for k in ks):
        return "te0", "clip_l", "", "toolkit"
    if "token_embedding.weight" in ks and any(k.startswith("transformer.resblocks.") for k in ks):
        n = _blocks(keys, r"transformer\.resblocks\.(\d+)\.")
        return ("te1", "bigg", "", "toolkit") if n > 24 else ("te", "vit_h", "", "toolkit")
    if any(k.startswith("encoder.down.") for k in ks) and any(k.startswith("decoder.up.") for k in ks):
        return "vae", "vae", "", "toolkit"
    if any(k.startswith("input_blocks.") for k in ks) and any(k.startswith("output_blocks.") for k in ks):
        kind = "unet-sdxl" if "label_emb.0.0.weight" in ks else "unet-sd1"
        return "unet", kind, "", "toolkit"
    return None


def detect(ck: Checkpoint) -> Anatomy:
    """Recognises a checkpoint or an exported component from its keys and a few shapes."""
    keys = ck.keys()
    a = Anatomy(path=str(ck.path), arch="unknown")
    _recognise(a, ck, keys)
    _assign_keys(a, ck, keys)
    first = ck.info.get(UNET + "input_blocks.0.0.weight") or ck.info.get("input_blocks.0.0.weight")
    if first is not None and len(first.shape) == 4:
        a.variant = VARIANTS.get(first.shape[1], f"{first.shape[1]}-channel input")
    if a.arch == "unknown":
        a.notes.append("layout not recognised: no known component prefix or exported-component keys")
    return a


def _recognise(a: Anatomy, ck: Checkpoint, keys: list[str]) -> None:
    """The architecture (or exported-component layout) and its component slots."""
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has(XL_TE1) or (has(XL_TE0) and has(UNET)):
        a.arch = "sdxl"
    elif has(REFINER_TE):
        a.arch = "sdxl-refiner"
    elif has(SD2_TE):
        a.arch = "sd2"
    elif has(SD1_TE):
        a.arch = "sd1"
    elif has(UNET):
        # UNET only: tell SD1/SD2/SDXL from cross-attention context width and label_emb.
        if UNET + "label_emb.0.0.weight" in ck:
            a.arch = "sdxl"
        else:
            k = next((k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
            shape = ck.info[k].shape if k else (1, 0)
            if len(shape) != 2 or shape[0] == 0:
                raise ArchitectureError(f"{ck.path}: tensor '{k}': shape {list(shape)}, but a cross-attention "
                                        "key projection is a non-empty matrix")
            ratio = shape[1] / shape[0]
            a.arch = "sd2" if ratio > 3 else "sd1"
    elif has(XL_TE0):
        a.arch, a.layout = "component", "prefixed"
        a.components["te0"] = Component("te0", "clip_l", XL_TE0, [])
    else:
        exp = _exported(keys)
        if exp:
            name, kind, prefix, lay = exp
            a.arch, a.layout = "component", lay
            a.components[name] = Component(name, kind, prefix, [])
    if a.arch in ARCHES:
        for name, (prefix, kind) in ARCHES[a.arch].items():
            if has(prefix):
                a.components[name] = Component(name, kind, prefix, [])


def _assign_keys(a: Anatomy, ck: Checkpoint, keys: list[str]) -> None:
    """Each component's keys, statistics and missing keys; the rest sorted into buffers, EMA,
    v-prediction markers and junk."""
    # Keys of each component, and what is missing against the reference tables.
    assigned: set[str] = set()
    for c in a.components.values():
        if c.prefix:
            c.keys = [k for k in keys if k.startswith(c.prefix)]
        else:
            c.keys = [k for k in keys if a.component_of(k) is None and k not in assigned]
        assigned.update(c.keys)
        have = {canonical_name(c, k) for k in c.keys}
        # Report missing keys in the file's own spelling (with or without ``text_model.``).
        with_tm = any(k[len(c.prefix):].startswith("text_model.") for k in c.keys)
        c.missing = [
            c.prefix + (k if with_tm else _strip_tm(c.kind, k))
            for k, v in reference(c.kind).items()
            if not v["optional"] and _strip_tm(c.kind, k) not in have
        ]
        dt: Counter[str] = Counter()
        for k in c.keys:
            t = ck.info[k]
            c.tensors += 1
            c.params += t.numel
            c.bytes += t.nbytes
            dt[t.dtype] += 1
        c.dtypes = dict(dt)
    for k in keys:
        if k in assigned:
            continue
        if k in SCHEDULER_KEYS:
            a.buffers.append(k)
        elif k.startswith(EMA):
            a.ema += 1
        elif k in VPRED_KEYS:
            a.vpred.append(k)
        else:
            a.junk.append(k)


def position_ids_status(ck: Checkpoint, key: str) -> str:
    """'ok', 'missing', 'float' (stored as float, values right), or 'broken' (values not 0..76)."""
    if key not in ck:
        return "missing"
    t = ck.info[key]
    v = ck.tensor(key)
    if t.is_float:
        ok = np.array_equal(np.asarray(v, dtype=np.float64).ravel(), np.arange(v.size))
        return "float" if ok else "broken"
    return "ok" if np.array_equal(np.asarray(v).ravel(), np.arange(v.size)) else "broken"
