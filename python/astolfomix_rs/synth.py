"""Realistic synthetic checkpoints from the real key layouts (SD1 LDM, SDXL SGM), with large
dimensions shrunk so tests and demos run in seconds. Values are deterministic per (seed, key), and
each component can take its own seed, so tests can make models that share a text encoder."""

from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from .io import save

LAYOUT_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json"}


@lru_cache(maxsize=None)
def layout(arch: str) -> dict[str, dict]:
    """Every key of a real checkpoint of ``arch`` ("sd1" or "sdxl"): shape, dtype, component, optional."""
    if arch not in LAYOUT_FILES:
        raise ValueError(f"unknown layout '{arch}' (use {', '.join(LAYOUT_FILES)})")
    text = resources.files("astolfomix_rs").joinpath("data", LAYOUT_FILES[arch]).read_text()
    return json.loads(text)


def shrink(shape: list[int], factor: int) -> tuple[int, ...]:
    """Divides every dimension of 64 or more by ``factor``; small ones (channels in, kernel sizes,
    77 positions) stay, so the shapes that tell variants apart survive."""
    if factor <= 1:
        return tuple(shape)
    return tuple(max(1, d // factor) if d >= 64 and d != 77 else d for d in shape)


_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
             "conditioner.embedders.0.model.", "cond_stage_model.model.", "model.diffusion_model.", "first_stage_model.")


def _values(seed: int, key: str, shape: tuple[int, ...], fast: bool = False) -> np.ndarray:
    # Seeded by the key without its component prefix: with the same seed, SD1's CLIP and an SDXL
    # TE0 (or a refiner's and a base's bigG) hold the same weights, as real ones do.
    inner = next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
    rng = np.random.default_rng([seed, zlib.crc32(inner.encode())])
    if fast:
        # Random fp16 bit patterns with |x| < 1 (no inf/NaN): 10x faster than normals at full size.
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(0xB7FF)
        return bits.view(np.float16)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)


def make_state(
    arch: str = "sdxl",
    *,
    factor: int = 32,
    seed: int = 0,
    seeds: Mapping[str, int] | None = None,
    dtype: str = "F16",
    optional: bool = True,
    drop: tuple[str, ...] = (),
    fast: bool = False,
    variant: str = "normal",
    ema: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """The tensors of one synthetic checkpoint. ``seeds`` overrides the seed per component
    ("diffuser", "clip_l", "clip_g", "vae", ...); ``drop`` lists keys to leave out; ``fast``
    makes F16 values from random bits (for full-size benchmark inputs); ``only`` keeps the listed
    components."""
    seeds = dict(seeds or {})
    out: dict[str, object] = {}
    for key, spec in variant_layout(arch).items():
        comp = spec["component"]
        if key in drop or (spec["optional"] and not optional and comp != "clip_l") or (only and comp not in only):
            continue
        if comp == "ema" or key in ("v_pred", "ztsnr") or key.startswith("edm_vpred"):
            continue  # variants of their own; tests add them on purpose
        shape = shrink(spec["shape"], factor) if comp != "scheduler" else tuple(spec["shape"])
        if key == "model.diffusion_model.input_blocks.0.0.weight":
            shape = (shape[0], VARIANT_CHANNELS[variant], *shape[2:])
        if spec["dtype"].startswith("int"):
            if key.endswith("position_ids"):
                out[key] = np.arange(shape[-1], dtype=np.int64).reshape(shape)
            else:
                out[key] = np.zeros(shape, dtype=np.int64)
            continue
        if fast and dtype == "F16" and comp != "scheduler":
            out[key] = _values(seeds.get(comp, seed), key, shape, fast=True)
            continue
        v = _values(seeds.get(comp, seed), key, shape)
        if comp == "scheduler":
            out[key] = np.linspace(0.001, 0.999, num=shape[0], dtype=np.float32)
        elif dtype == "F16":
            out[key] = v.astype(np.float16)
        elif dtype == "BF16":
            bits = v.view(np.uint32)
            out[key] = ("BF16", shape, ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16))
        else:
            out[key] = v.astype(np.float32 if dtype == "F32" else np.float64)
    if ema:
        for key in list(out):
            if key.startswith("model.diffusion_model.") and isinstance(out[key], np.ndarray):
                out["model_ema." + key[len("model."):].replace(".", "")] = out[key]
        out["model_ema.decay"] = np.array(0.9999, dtype=np.float32)
        out["model_ema.num_updates"] = np.array(1000, dtype=np.int32)
    return out


VARIANT_CHANNELS = {"normal": 4, "inpainting": 9, "instruct-pix2pix": 8, "depth": 5}


def variant_layout(arch: str) -> dict[str, dict]:
    """Key tables for the architectures without a reference file, derived from the ones we have:
    ``sd2`` (SD1 UNET with 1024-wide cross-attention and linear proj_in/out, OpenCLIP ViT-H text
    encoder) and ``sdxl-refiner`` (SDXL UNET keys with a 384-wide first conv, bigG at slot 0).
    Approximate where the real files differ in ways no test here depends on."""
    if arch in LAYOUT_FILES:
        return layout(arch)
    if arch == "sd2":
        from .anatomy import SD2_TE, reference

        out = {}
        for k, v in layout("sd1").items():
            if v["component"] == "clip_l":
                continue
            v = dict(v)
            if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                v["shape"] = [v["shape"][0], 1024]
            if k.endswith(("proj_in.weight", "proj_out.weight")) and len(v["shape"]) == 4:
                v["shape"] = v["shape"][:2]
            out[k] = v
        for k, v in reference("vit_h").items():
            out[SD2_TE + k] = {**v, "component": "vit_h"}
        return out
    if arch == "sdxl-refiner":
        from .anatomy import REFINER_TE, XL_TE1

        out = {}
        for k, v in layout("sdxl").items():
            if v["component"] == "clip_l":
                continue
            v = dict(v)
            if k.startswith(XL_TE1):
                k = REFINER_TE + k[len(XL_TE1):]
            if k == "model.diffusion_model.input_blocks.0.0.weight":
                v["shape"] = [384, 4, 3, 3]
            out[k] = v
        return out
    raise ValueError(f"unknown layout '{arch}'")


def make_checkpoint(path: str | os.PathLike[str], arch: str = "sdxl", *, metadata: Mapping[str, str] | None = None,
                    overwrite: bool = True, **kw) -> Path:
    """Writes one synthetic checkpoint (see :func:`make_state`)."""
    save(path, make_state(arch, **kw), metadata, overwrite=overwrite, durable=False)
    return Path(path)
