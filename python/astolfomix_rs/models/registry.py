"""Model knowledge, in one place: the architectures (prefixes, component slots and aliases,
variants), the reference key tables (shipped in ``data/``, taken from real SD1 and SDXL
checkpoints; SD2 and the refiner derived from them), the model-toolkit reference constants, and
how model ids are read from file names. anatomy, recipes, the toolkit commands and the synthetic
generator all read it; adding an architecture starts here."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ArchitectureError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
XL_TE0 = "conditioner.embedders.0.transformer."
XL_TE1 = "conditioner.embedders.1.model."
REFINER_TE = "conditioner.embedders.0.model."
EMA = "model_ema."

# Component slots per architecture: name -> (prefix, kind).
ARCHES: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"unet": (UNET, "unet-sd1"), "te": (SD1_TE, "clip_l"), "vae": (VAE, "vae")},
    "sd2": {"unet": (UNET, "unet-sd2"), "te": (SD2_TE, "vit_h"), "vae": (VAE, "vae")},
    "sdxl": {"unet": (UNET, "unet-sdxl"), "te0": (XL_TE0, "clip_l"), "te1": (XL_TE1, "bigg"), "vae": (VAE, "vae")},
    "sdxl-refiner": {"unet": (UNET, "unet-refiner"), "te1": (REFINER_TE, "bigg"), "vae": (VAE, "vae")},
}
ALIASES = {"clip_l": "te0", "clip_g": "te1", "clip": "te", "text_encoder": "te"}
KIND_LABEL = {
    "clip_l": "OpenAI CLIP ViT-L/14 (SD1 CLIP / SDXL TE0)",
    "bigg": "OpenCLIP ViT-bigG/14 (SDXL TE1)",
    "vit_h": "OpenCLIP ViT-H/14 (SD2 text encoder)",
    "vae": "VAE",
    "unet-sd1": "SD1 UNET", "unet-sd2": "SD2 UNET", "unet-sdxl": "SDXL UNET", "unet-refiner": "SDXL refiner UNET",
}
SCHEDULER_KEYS = {
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "logvar", "model_ema.decay", "model_ema.num_updates",
}
VPRED_KEYS = {"v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"}
VARIANTS = {4: "normal", 9: "inpainting", 8: "instruct-pix2pix", 5: "depth"}


def _strip(table: dict[str, dict], prefix: str, component: str) -> dict[str, dict]:
    return {k[len(prefix):]: v for k, v in table.items() if v["component"] == component and k.startswith(prefix)}


def _vit_h() -> dict[str, dict]:
    def e(shape, optional=False):
        return {"shape": shape, "dtype": "float32", "optional": optional}

    keys = {
        "token_embedding.weight": e([49408, 1024]), "positional_embedding": e([77, 1024]),
        "ln_final.weight": e([1024]), "ln_final.bias": e([1024]),
        "text_projection": e([1024, 1024], True), "logit_scale": e([], True),
    }
    for b in range(24):
        p = f"transformer.resblocks.{b}."
        opt = b == 23  # some SD2 finetunes drop the last block
        for name, shape in (
            ("ln_1.weight", [1024]), ("ln_1.bias", [1024]), ("ln_2.weight", [1024]), ("ln_2.bias", [1024]),
            ("attn.in_proj_weight", [3072, 1024]), ("attn.in_proj_bias", [3072]),
            ("attn.out_proj.weight", [1024, 1024]), ("attn.out_proj.bias", [1024]),
            ("mlp.c_fc.weight", [4096, 1024]), ("mlp.c_fc.bias", [4096]),
            ("mlp.c_proj.weight", [1024, 4096]), ("mlp.c_proj.bias", [1024]),
        ):
            keys[p + name] = e(shape, opt)
    return keys


@lru_cache(maxsize=None)
def reference(kind: str) -> dict[str, dict]:
    """Reference keys of a component kind, without prefix: key -> {shape, dtype, optional}."""
    sd1, xl = key_table("sd1"), key_table("sdxl")
    if kind == "clip_l":
        return _strip(sd1, SD1_TE, "clip_l")
    if kind == "bigg":
        return _strip(xl, XL_TE1, "clip_g")
    if kind == "vit_h":
        return _vit_h()
    if kind == "vae":
        return _strip(sd1, VAE, "vae")
    if kind in ("unet-sd1", "unet-sd2"):
        return _strip(sd1, UNET, "diffuser")
    if kind == "unet-sdxl":
        return _strip(xl, UNET, "diffuser")
    return {}  # the refiner UNET: no reference table; recognised by prefix and shapes

#: the webui's ``modelspec.architecture`` value per architecture
MODELSPEC = {
    "sdxl": "stable-diffusion-xl-v1-base", "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
}


KEY_TABLE_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json"}


@lru_cache(maxsize=None)
def key_table(arch: str) -> dict[str, dict]:
    """Every key of a real checkpoint of ``arch`` ("sd1" or "sdxl"): shape, dtype, component, optional."""
    if arch not in KEY_TABLE_FILES:
        raise ArchitectureError(f"unknown architecture '{arch}' (use {', '.join(KEY_TABLE_FILES)})")
    text = resources.files("astolfomix_rs").joinpath("data", KEY_TABLE_FILES[arch]).read_text()
    return json.loads(text)


VARIANT_CHANNELS = {"normal": 4, "inpainting": 9, "instruct-pix2pix": 8, "depth": 5}


def arch_key_table(arch: str) -> dict[str, dict]:
    """Key tables for the architectures without a reference file, derived from the ones we have:
    ``sd2`` (SD1 UNET with 1024-wide cross-attention and linear proj_in/out, OpenCLIP ViT-H text
    encoder) and ``sdxl-refiner`` (SDXL UNET keys with a 384-wide first conv, bigG at slot 0).
    Approximate where the real files differ in ways no test here depends on."""
    if arch in KEY_TABLE_FILES:
        return key_table(arch)
    if arch == "sd2":
        out = {}
        for k, v in key_table("sd1").items():
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
        out = {}
        for k, v in key_table("sdxl").items():
            if v["component"] == "clip_l":
                continue
            v = dict(v)
            if k.startswith(XL_TE1):
                k = REFINER_TE + k[len(XL_TE1):]
            if k == "model.diffusion_model.input_blocks.0.0.weight":
                v["shape"] = [384, 4, 3, 3]
            out[k] = v
        return out
    raise ArchitectureError(f"unknown architecture '{arch}'")


# ---------------------------------------------------------------------------------------------
# The webui model toolkit's reference constants: (reference sum, scale) per metric field.

REFS = {"unet": (-6131.5400, 10000), "vae": (17870.7051, 10000), "clip_l": (-2097.8596, 1000000), "vit_h": (-8757.5630, 10000)}
KNOWN = {
    "vae": {0: "SD-v1", 869: "SD-v2", 2982: "NAI", 155: "WD-VAE-v1", 41: "WD-VAE-v2"},
    "clip": {0: "SD-v1", 1141: "SD-v2", 2543: "WD-v1-4"},
}

TOOLKIT_STRIP = {"clip_l": ".text_model."}
VIT_L_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 49408,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
}


# ---------------------------------------------------------------------------------------------
# Model ids in file names (``_x05-name.safetensors``, ``x05a-name.safetensors``)

_ID = re.compile(r"^_?x(\d+)([A-Za-z]*)-")


def model_id(path: str | os.PathLike[str]) -> str | None:
    m = _ID.match(Path(path).name)
    return f"{int(m.group(1)):02d}{m.group(2).lower()}" if m else None
