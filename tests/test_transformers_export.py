"""The transformers layout of an exported ViT-L CLIP loads in transformers itself, offline, with no
missing or unexpected weights, and computes with our weights."""

from __future__ import annotations

import os
import warnings

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.commands import components as tk
from astolfomix_rs.core.save import save
from astolfomix_rs.tools.synth import make_state

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")


def test_transformers_layout_loads_without_missing_or_unexpected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A full-size SD1 text encoder (the config is the real ViT-L/14 one), nothing else.
    state = make_state("sd1", factor=1, only=("clip_l",))
    save(tmp_path / "te.safetensors", state, durable=False)
    tk.export(tmp_path / "te.safetensors", "te", tmp_path / "hf", layout="transformers", dtype="f32")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    src = am.Checkpoint(tmp_path / "te.safetensors")
    k = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    # transformers 4 names it text_model.encoder..., transformers 5 encoder...
    sd = model.state_dict()
    name = next(n for n in ("text_model.encoder.layers.3.mlp.fc1.weight", "encoder.layers.3.mlp.fc1.weight") if n in sd)
    got = sd[name].detach().numpy()
    np.testing.assert_array_equal(got, src.tensor(k).astype(np.float32))
    out = model(input_ids=torch.tensor([[49406, 320, 1125, 49407]]))
    assert out.last_hidden_state.shape == (1, 4, 768) and torch.isfinite(out.last_hidden_state).all()


def test_transformers_layout_is_only_for_vit_l(tmp_path):
    from astolfomix_rs.errors import ArchitectureError
    from astolfomix_rs.tools.synth import make_checkpoint

    p = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=32)
    with pytest.raises(ArchitectureError, match="ViT-L"):
        tk.export(p, "te1", tmp_path / "hf", layout="transformers")
