"""Realistic synthetic checkpoints from the real key layouts (SD1 LDM, SDXL SGM), with large
dimensions shrunk so tests and demos run in seconds. Values are deterministic per (seed, key), and
each component can take its own seed, so tests can make models that share a text encoder."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.save import save
from ..models.registry import VARIANT_CHANNELS, arch_key_table


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
) -> dict[str, Any]:
    """The tensors of one synthetic checkpoint. ``seeds`` overrides the seed per component
    ("diffuser", "clip_l", "clip_g", "vae", ...); ``drop`` lists keys to leave out; ``fast``
    makes F16 values from random bits (for full-size benchmark inputs); ``only`` keeps the listed
    components."""
    seeds = dict(seeds or {})
    out: dict[str, Any] = {}
    for key, spec in arch_key_table(arch).items():
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


def make_checkpoint(path: str | os.PathLike[str], arch: str = "sdxl", *, metadata: Mapping[str, str] | None = None,
                    overwrite: bool = True, **kw) -> Path:
    """Writes one synthetic checkpoint (see :func:`make_state`)."""
    save(path, make_state(arch, **kw), metadata, overwrite=overwrite, durable=False)
    return Path(path)
