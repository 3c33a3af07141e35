"""``astolfomix convert`` (issue 10): each option against a NumPy reference, and pickled
``.ckpt`` files read without running them (old framework layouts convert, hostile ones are
refused before anything runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.cli import main
from astolfomix_rs.commands.convert import convert
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import ArchitectureError, InvalidFileError
from astolfomix_rs.models.registry import EMA
from astolfomix_rs.tools.synth import make_checkpoint, make_state
from reference import decode, encode


def _raw(ck, k):
    return ck.raw(k).tobytes()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_dtype_conversion_matches_numpy(tmp_path, dtype):
    src = make_checkpoint(tmp_path / "m.safetensors", "sd1", factor=32, dtype="F32")
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", dtype]) == 0
    a, b = am.Checkpoint(src), am.Checkpoint(out)
    want_dt = {"f16": "F16", "bf16": "BF16", "f32": "F32"}[dtype]
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        if a.info[k].is_float:
            assert b.info[k].dtype == want_dt
            want = encode(decode(a.raw(k), a.info[k].dtype).astype(np.float64), want_dt)
            assert _raw(b, k) == want.tobytes(), k
        else:
            assert _raw(b, k) == _raw(a, k) and b.info[k].dtype == a.info[k].dtype


def test_conversion_keeps_negative_zero_and_content_hashes(tmp_path):
    from astolfomix_rs.commands.hashing import pool_hashes

    st = make_state("sd1", factor=32)
    k = next(k for k in st if st[k].dtype == np.float16 and st[k].size > 4)
    st[k] = st[k].copy()
    st[k].flat[:3] = np.float16(-0.0)
    save(tmp_path / "m.safetensors", st)
    convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", dtype="f32")
    got = am.Checkpoint(tmp_path / "o.safetensors").tensor(k)
    assert np.signbit(got.flat[:3]).all()
    h = pool_hashes([tmp_path / "m.safetensors", tmp_path / "o.safetensors"], want=("content",), progress=False)
    assert h[0]["components"] == h[1]["components"]  # fp16 -> fp32 keeps every content hash


def test_prune_drops_ema_and_junk_and_keeps_the_rest_bit_for_bit(tmp_path):
    st = make_state("sd1", factor=32, ema=True)
    st["optimizer_junk.step"] = np.array([3], np.int64)
    save(tmp_path / "m.safetensors", st)
    r = convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", prune=True)
    a, b = am.Checkpoint(tmp_path / "m.safetensors"), am.Checkpoint(tmp_path / "o.safetensors")
    gone = [k for k in a.keys() if k.startswith(EMA) or k == "optimizer_junk.step"]
    assert len(gone) > 10 and sorted(r.pruned) == sorted(gone)
    assert sorted(b.keys()) == sorted(set(a.keys()) - set(gone))
    assert all(_raw(a, k) == _raw(b, k) for k in b.keys())


def test_fix_position_ids_rewrites_broken_ones_and_adds_missing_ones(tmp_path):
    st = make_state("sdxl", factor=32)
    pid = next(k for k in st if k.endswith("position_ids"))
    st[pid] = (np.arange(77, dtype=np.float32) + 0.001).reshape(1, 77)  # the classic float drift
    save(tmp_path / "m.safetensors", st)
    r = convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", fix_position_ids=True)
    assert r.position_ids == {"te0": "rewritten as int64 0..76"}
    b = am.Checkpoint(tmp_path / "o.safetensors")
    assert b.info[pid].dtype == "I64" and np.array_equal(b.tensor(pid), np.arange(77).reshape(1, 77))
    del st[pid]
    save(tmp_path / "n.safetensors", st)
    r = convert(tmp_path / "n.safetensors", tmp_path / "p.safetensors", fix_position_ids=True)
    assert r.position_ids == {"te0": "added as int64 0..76"}
    assert np.array_equal(am.Checkpoint(tmp_path / "p.safetensors").tensor(pid), np.arange(77).reshape(1, 77))


def test_bake_vae_takes_every_vae_tensor_from_the_other_file(tmp_path):
    from astolfomix_rs.commands.components import export

    m = make_checkpoint(tmp_path / "m.safetensors", "sd1", factor=32, seed=1)
    v = make_checkpoint(tmp_path / "v.safetensors", "sd1", factor=32, seed=2)
    export(v, "vae", tmp_path / "vae.safetensors")  # an exported VAE (toolkit layout) works as well
    for vae in (v, tmp_path / "vae.safetensors"):
        out = tmp_path / f"o-{vae.name}"
        r = convert(m, out, bake_vae=vae)
        a, src, b = am.Checkpoint(m), am.Checkpoint(v), am.Checkpoint(out)
        assert r.vae_from == vae.name and list(b.keys()) == list(a.keys())
        for k in a.keys():
            want = src if k.startswith("first_stage_model.") else a
            assert _raw(b, k) == _raw(want, k), k
    other = make_checkpoint(tmp_path / "big.safetensors", "sd1", factor=16)  # every VAE shape differs
    with pytest.raises(ArchitectureError, match="cannot bake"):
        convert(m, tmp_path / "bad.safetensors", bake_vae=other)
    assert not (tmp_path / "bad.safetensors").exists()


# --- Pickled checkpoints -------------------------------------------------------------------------

FRAMEWORK = {
    "pytorch_lightning/__init__.py": "",
    "pytorch_lightning/callbacks/__init__.py": "",
    "pytorch_lightning/callbacks/model_checkpoint.py": textwrap.dedent("""
        class ModelCheckpoint:
            def __init__(self):
                self.best_model_score = 0.5
        """),
    "pytorch_lightning/utilities/__init__.py": "",
    "pytorch_lightning/utilities/parsing.py": "class AttributeDict(dict):\n    pass\n",
}

MAKE_CKPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=g)
    sd = {
        "model.diffusion_model.w": base,
        "model.diffusion_model.wt": base.t(),               # a view: strides, shared storage
        "model.diffusion_model.half": torch.randn(5, generator=g).half(),
        "model.diffusion_model.bf": torch.randn(4, generator=g).bfloat16(),
        "model.diffusion_model.slice": base[2:5, 1],          # an offset, non-contiguous view
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.decay": torch.tensor(0.9999),
    }
    ckpt = {"state_dict": sd, "global_step": np.int64(4200), "epoch": 3,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25)}},
            "hyper_parameters": AttributeDict(lr=1e-4), "optimizer_states": [{"state": {}}]}
    torch.save(ckpt, sys.argv[1])
    np.savez(sys.argv[2], **{k: (v.float() if v.dtype == torch.bfloat16 else v).contiguous().numpy() for k, v in sd.items()})
""")


def _framework(tmp_path):
    root = tmp_path / "fw"
    for rel, text in FRAMEWORK.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_an_old_training_checkpoint_converts_without_its_framework(tmp_path, capsys):
    pytest.importorskip("torch")
    fw = _framework(tmp_path)
    ck = tmp_path / "old.ckpt"
    env = {**os.environ, "PYTHONPATH": str(fw)}
    subprocess.run([sys.executable, "-c", MAKE_CKPT, str(ck), str(tmp_path / "want.npz")], env=env, check=True, timeout=300)
    import torch

    with pytest.raises(Exception):  # what users meet today: the safe loader refuses the framework classes
        torch.load(ck, weights_only=True)
    out = tmp_path / "new.safetensors"
    assert main(["convert", str(ck), str(out), "--json"]) == 0  # no pytorch_lightning here
    assert json.loads(capsys.readouterr().out)["skipped"] == []  # every state_dict entry is a tensor
    want = np.load(tmp_path / "want.npz")
    got = am.Checkpoint(out)
    assert sorted(got.keys()) == sorted(want.files)
    for k in want.files:
        g = got.tensor(k)
        assert g.shape == want[k].shape, k
        np.testing.assert_array_equal(np.asarray(g, dtype=np.float64), want[k].astype(np.float64), err_msg=k)
    assert got.info["model.diffusion_model.bf"].dtype == "BF16" and got.info["model.diffusion_model.half"].dtype == "F16"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # With options: the same plan as for safetensors inputs.
    assert main(["convert", str(ck), str(tmp_path / "p.safetensors"), "--dtype", "f16", "--prune"]) == 0
    p = am.Checkpoint(tmp_path / "p.safetensors")
    assert "model_ema.decay" not in p.keys() and p.info["model.diffusion_model.w"].dtype == "F16"


HOSTILE = textwrap.dedent("""
    import os, sys, torch
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Evil()}, sys.argv[1])
""")


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    pytest.importorskip("torch")
    ck, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", HOSTILE, str(ck), str(marker)], check=True, timeout=300)
    assert not marker.exists()
    assert main(["convert", str(ck), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "system" in err and "would run code" in err and "nothing was run" in err, err
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
    # Damaged or foreign pickles are clear errors too.
    (tmp_path / "legacy.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(InvalidFileError, match="legacy"):
        convert(tmp_path / "legacy.ckpt", tmp_path / "o.safetensors")
    import zipfile

    with zipfile.ZipFile(tmp_path / "junk.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    with pytest.raises(InvalidFileError, match="cannot read its pickle"):
        convert(tmp_path / "junk.ckpt", tmp_path / "o.safetensors")
