"""Full SDXL size (6.9 GB per file): layout, detection on the real shapes, and a merge checked
against numpy on sampled tensors. Slow: deselect with ``-m 'not slow'``."""

from __future__ import annotations

import shutil

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.models.anatomy import detect, reference
from astolfomix_rs.tools.synth import make_checkpoint
from reference import emulate_mean

pytestmark = pytest.mark.slow


def test_full_size_sdxl_merge(tmp_path):
    need = 3 * 6.95e9 + 2e9
    if shutil.disk_usage(tmp_path).free < need:
        pytest.skip(f"needs {need / 1e9:.0f} GB free disk for three full-size SDXL files")
    try:
        _check(tmp_path)
    finally:  # 21 GB: never leave them behind, even when the test fails
        for p in tmp_path.glob("*.safetensors"):
            p.unlink()


def _check(tmp_path):
    files = [make_checkpoint(tmp_path / f"_x{i:02d}-full.safetensors", "sdxl", factor=1, seed=i, fast=True) for i in (1, 2)]
    ck = am.Checkpoint(files[0])
    assert 6.8e9 < ck.file_len < 7.0e9 and len(ck) == 2527
    a = detect(ck)
    assert a.arch == "sdxl" and not a.junk
    for c in a.components.values():
        assert not c.missing
        ref = reference(c.kind)
        for k in c.keys:  # the real shapes, not shrunk ones
            name = k[len(c.prefix):]
            if name in ref:
                assert list(ck.info[k].shape) == ref[name]["shape"], k
    assert round(sum(c.params for c in a.components.values()) / 1e9, 2) == 3.47
    out = tmp_path / "merged.safetensors"
    r = am.mean(files, out, progress=False)
    cks = [am.Checkpoint(f) for f in files]
    assert r.bytes_read == sum(t.nbytes for c in cks for t in c.info.values() if t.is_float) + sum(
        t.nbytes for t in cks[0].info.values() if not t.is_float)
    res = am.Checkpoint(out)
    for k in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
              "conditioner.embedders.1.model.token_embedding.weight", "first_stage_model.decoder.conv_out.weight"):
        expect = emulate_mean([(np.array(c.raw(k)), c.info[k].dtype) for c in cks], "F16")
        assert res.raw(k).tobytes() == expect.tobytes(), k
