"""Architecture detection, the toolkit metric, hashes, export/import and compare."""

from __future__ import annotations

import hashlib
import json

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.cli import main
from astolfomix_rs.commands import components as tk
from astolfomix_rs.commands import pool
from astolfomix_rs.commands.hashing import file_hashes
from astolfomix_rs.commands.inspect import escape, nonfinite, position_ids_report  # noqa: F401
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import ArchitectureError, InvalidFileError
from astolfomix_rs.models.anatomy import XL_TE0, detect
from astolfomix_rs.tools.synth import make_checkpoint, make_state


@pytest.mark.parametrize("arch,variant", [
    ("sd1", "normal"), ("sd1", "inpainting"), ("sd1", "instruct-pix2pix"), ("sd2", "normal"), ("sd2", "depth"),
    ("sdxl", "normal"), ("sdxl", "inpainting"), ("sdxl-refiner", "normal"),
])
def test_detects_architecture_and_variant(tmp_path, arch, variant):
    p = make_checkpoint(tmp_path / "m.safetensors", arch, factor=32, variant=variant)
    a = detect(am.Checkpoint(p))
    assert (a.arch, a.variant) == (arch, variant)
    expected = {"sd1": {"unet", "te", "vae"}, "sd2": {"unet", "te", "vae"}, "sdxl": {"unet", "te0", "te1", "vae"},
                "sdxl-refiner": {"unet", "te1", "vae"}}[arch]
    assert set(a.components) == expected
    assert not a.junk and all(not c.missing for c in a.components.values())
    counts = {n: c.tensors for n, c in a.components.items()}
    if arch == "sdxl":
        assert counts == {"unet": 1680, "te0": 197, "te1": 390, "vae": 248}
    if arch == "sd1":
        assert counts == {"unet": 686, "te": 197, "vae": 248}
    if arch == "sd2":
        assert counts["te"] == 294 and a.components["te"].kind == "vit_h"


def test_ema_and_junk_and_missing_key(tmp_path):
    state = make_state("sd1", factor=32, ema=True, drop=("model.diffusion_model.out.2.bias",))
    state["some.random.junk"] = np.zeros(3, np.float16)
    save(tmp_path / "m.safetensors", state)
    a = detect(am.Checkpoint(tmp_path / "m.safetensors"))
    assert a.ema == 685 and a.junk == ["some.random.junk"]  # the dropped key is not in the EMA either
    assert a.components["unet"].missing == ["model.diffusion_model.out.2.bias"]
    info = json.loads(_cli_out(["inspect", str(tmp_path / "m.safetensors"), "--json"]))[0]
    assert info["components"]["unet"]["missing"] == ["model.diffusion_model.out.2.bias"]
    text = _cli_out(["inspect", str(tmp_path / "m.safetensors")])
    assert "MISSING 1 keys: model.diffusion_model.out.2.bias" in text and "junk keys (1): some.random.junk" in text


def _cli_out(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_exported_components_are_recognised(tmp_path):
    src = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=32)
    for comp, layout, kind in [("te0", "toolkit", "clip_l"), ("te1", "toolkit", "bigg"), ("vae", "toolkit", "vae"),
                               ("unet", "toolkit", "unet-sdxl")]:
        out = tmp_path / f"{comp}.safetensors"
        tk.export(src, comp, out, layout=layout)
        a = detect(am.Checkpoint(out))
        assert a.arch == "component" and a.layout == layout
        (c,) = a.components.values()
        assert c.kind == kind and not c.missing, (comp, c.missing[:3])
    tk.export(src, "te0", tmp_path / "hf", layout="transformers")
    a = detect(am.Checkpoint(tmp_path / "hf" / "model.safetensors"))
    assert a.layout == "transformers" and a.components["te0"].kind == "clip_l"
    # A file holding the prefixed TE0 alone
    ck = am.Checkpoint(src)
    save(tmp_path / "prefixed.safetensors", {k: ck.tensor(k) for k in ck.keys() if k.startswith(XL_TE0)})
    a = detect(am.Checkpoint(tmp_path / "prefixed.safetensors"))
    assert a.layout == "prefixed" and a.components["te0"].tensors == 197


def test_unknown_layout_is_reported(tmp_path):
    save(tmp_path / "x.safetensors", {"foo.weight": np.zeros(3, np.float32)})
    a = detect(am.Checkpoint(tmp_path / "x.safetensors"))
    assert a.arch == "unknown" and a.junk == ["foo.weight"] and a.notes


def test_position_ids_states(tmp_path):
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    for name, val, want in [("ok", np.arange(77, dtype=np.int64)[None], "ok"),
                            ("float", np.arange(77, dtype=np.float32)[None], "float"),
                            ("broken", (np.arange(77) * 1.0000001).astype(np.float32)[None] + 0.4, "broken")]:
        state = make_state("sd1", factor=32)
        state[key] = val
        save(tmp_path / f"{name}.safetensors", state)
        ck = am.Checkpoint(tmp_path / f"{name}.safetensors")
        assert position_ids_report(ck, detect(ck)) == {"te": want}
    state = make_state("sd1", factor=32, drop=(key,))
    save(tmp_path / "none.safetensors", state)
    ck = am.Checkpoint(tmp_path / "none.safetensors")
    assert position_ids_report(ck, detect(ck)) == {"te": "missing"}


def independent_metric_field(tensors, base, k):
    s = 0.0
    for t in tensors:
        h = t.astype(np.float16).astype(np.float64)
        s += float(np.sum(1.0 / (1.0 + np.exp(-h)) - 0.5))
    if s == 0:
        return "----"
    n = int(abs(s / base - 1) * k)
    while n >= 10000:
        n -= 5000
    return "%04d" % n


def test_toolkit_metric_matches_independent_formula(tmp_path):
    p = make_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=16, seed=3)
    ck = am.Checkpoint(p)
    a = detect(ck)
    m = tk.toolkit_metric(ck, a)
    te = [ck.tensor(k).astype(np.float32) for k in a.components["te"].keys if "mlp." in k and ".23." not in k]
    assert len(te) == 48
    vae = [ck.tensor(k).astype(np.float32) for k in a.components["vae"].keys if "encoder." in k or "decoder." in k]
    unet = [ck.tensor(k).astype(np.float32) for k in a.components["unet"].keys]
    assert m["fields"]["clip"] == independent_metric_field(te, -2097.8596, 1000000)
    assert m["fields"]["vae"] == independent_metric_field(vae, 17870.7051, 10000)
    assert m["fields"]["unet"] == independent_metric_field(unet, -6131.5400, 10000)
    assert m["metric"] == f"{m['fields']['unet']}/{m['fields']['vae']}/{m['fields']['clip']}"
    assert tk.metric_field(-2097.8596, tk.REFS["clip_l"]) == "0000"
    assert tk.metric_field(-2097.8596 * (1 + 2543.5e-6), tk.REFS["clip_l"]) == "2543"
    assert tk.metric_field(0.0, tk.REFS["vae"]) == "----"


def test_sdxl_te0_reads_against_vit_l_reference(tmp_path):
    # An SDXL whose TE0 equals an SD1 CLIP: both show the same CLIP field.
    sd1 = make_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=16, seeds={"clip_l": 7})
    xl = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=16, seeds={"clip_l": 7})
    m1 = tk.toolkit_metric(am.Checkpoint(sd1), detect(am.Checkpoint(sd1)))
    m2 = tk.toolkit_metric(am.Checkpoint(xl), detect(am.Checkpoint(xl)))
    assert m1["fields"]["clip"] == m2["fields"]["clip"] != "----"
    assert m2["fields"]["unet"] == "----"  # no SDXL UNET reference exists


def test_file_hashes_equal_hashlib(tmp_path):
    p = make_checkpoint(tmp_path / "m.safetensors", "sd1", factor=8)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = file_hashes(p)
    assert h["sha256"] == hashlib.sha256(raw).hexdigest()
    assert h["autov2"] == hashlib.sha256(raw).hexdigest()[:10]
    assert h["autov1"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert h["autov3"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert len(raw) > 0x110000


def test_te0_sdxl_to_sd1_and_back(tmp_path):
    xl = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=16, seeds={"clip_l": 11})
    sd1 = make_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=16, seed=5)
    assert _cli_out(["export", str(xl), "te0", str(tmp_path / "te0.safetensors"), "--dtype", "same"])
    _cli_out(["import", str(sd1), str(tmp_path / "te0.safetensors"), "te", str(tmp_path / "sd1_xlclip.safetensors")])
    h_xl = json.loads(_cli_out(["hash", str(xl), "--json"]))[0]["components"]["te0"]
    h_sd1 = json.loads(_cli_out(["hash", str(tmp_path / "sd1_xlclip.safetensors"), "--json"]))[0]["components"]
    assert h_sd1["te"] == h_xl
    orig = json.loads(_cli_out(["hash", str(sd1), "--json"]))[0]["components"]
    assert h_sd1["unet"] == orig["unet"] and h_sd1["vae"] == orig["vae"] and h_sd1["te"] != orig["te"]
    # Round trip SD1 -> SDXL -> SD1: tensors byte-identical
    tk.import_component(xl, sd1, "te0", tmp_path / "xl_sd1clip.safetensors")
    tk.import_component(tmp_path / "sd1_xlclip.safetensors", tmp_path / "xl_sd1clip.safetensors", "te",
                        tmp_path / "back.safetensors")
    a, b = am.Checkpoint(sd1), am.Checkpoint(tmp_path / "back.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():
        assert a.info[k].dtype == b.info[k].dtype and a.raw(k).tobytes() == b.raw(k).tobytes(), k


def test_import_writes_sound_position_ids(tmp_path):
    xl = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=16)
    state = make_state("sd1", factor=16)
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[pid] = (np.arange(77, dtype=np.float32)[None] + 0.3)
    save(tmp_path / "broken.safetensors", state)
    r = tk.import_component(xl, tmp_path / "broken.safetensors", "te0", tmp_path / "fixed.safetensors")
    assert r.position_ids == "broken"
    fixed = am.Checkpoint(tmp_path / "fixed.safetensors")
    key = XL_TE0 + "text_model.embeddings.position_ids"
    assert fixed.info[key].dtype == "I64" and fixed.tensor(key).tolist() == [list(range(77))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_import_in_place_is_atomic(tmp_path):
    sd1 = make_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=16, seed=1)
    other = make_checkpoint(tmp_path / "other.safetensors", "sd1", factor=16, seed=2)
    tk.import_component(sd1, other, "vae", in_place=True)
    a, b = am.Checkpoint(sd1), am.Checkpoint(other)
    vk = [k for k in a.keys() if k.startswith("first_stage_model.")]
    assert all(a.raw(k).tobytes() == b.raw(k).tobytes() for k in vk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors", "sd1.safetensors"]


def test_import_errors_leave_nothing(tmp_path):
    xl = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=16)
    sd1 = make_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=16)
    sd1_small = make_checkpoint(tmp_path / "small.safetensors", "sd1", factor=32)
    before = sorted(p.name for p in tmp_path.iterdir())
    sd2 = make_checkpoint(tmp_path / "sd2.safetensors", "sd2", factor=16)
    before.append("sd2.safetensors")
    with pytest.raises(ArchitectureError, match="no te1 component in this sd1 file"):  # no such slot
        tk.import_component(sd1, xl, "te1", tmp_path / "o.safetensors")
    with pytest.raises(ArchitectureError, match="needs \\(clip_l\\).*ViT-H"):  # wrong architecture for the slot
        tk.import_component(sd1, sd2, "te", tmp_path / "o.safetensors")
    with pytest.raises(ArchitectureError, match=r"is \[|but \["):  # shape mismatch
        tk.import_component(sd1, sd1_small, "te", tmp_path / "o.safetensors")
    state = make_state("sd1", factor=16, drop=("cond_stage_model.transformer.text_model.final_layer_norm.weight",))
    save(tmp_path / "missing.safetensors", state)
    before.append("missing.safetensors")
    with pytest.raises(ArchitectureError, match="final_layer_norm.weight' is missing"):
        tk.import_component(xl, tmp_path / "missing.safetensors", "te0", tmp_path / "o.safetensors")
    vae_only = tmp_path / "vae.safetensors"
    tk.export(sd1, "vae", vae_only)
    before.append("vae.safetensors")
    with pytest.raises(ArchitectureError, match="no te"):  # missing component
        tk.import_component(sd1, vae_only, "te", tmp_path / "o.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!garbage!")
    before.append("bad.safetensors")
    with pytest.raises(InvalidFileError):  # unreadable file
        tk.import_component(sd1, tmp_path / "bad.safetensors", "vae", tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_compare_groups_identical_text_encoders(tmp_path):
    files = []
    for i in range(1, 21):
        shared = i in (3, 7, 8, 15, 20)
        seeds = {"clip_l": 1000, "clip_g": 1000} if shared else {}
        files.append(make_checkpoint(tmp_path / f"_x{i:02d}-m{i}.safetensors", "sdxl", factor=64, seed=i, seeds=seeds))
    res = pool.compare(files)
    for comp in ("te0", "te1"):
        groups = res["components"][comp]["groups"]
        assert len(groups) == 16
        big = [g for g in groups if len(g["files"]) > 1]
        assert len(big) == 1 and sorted(big[0]["files"]) == sorted(str(files[i - 1]) for i in (3, 7, 8, 15, 20))
    assert len(res["components"]["unet"]["groups"]) == 20
    line = pool.selection_line(res, "te0", str(files[2]))
    assert line == "te0: 03,07,08,15,20=5"
    from astolfomix_rs.commands.recipe import parse_grid

    assert [str(m) for m in parse_grid(line).selections["te0"].listed] == ["03", "07", "08", "15", "20"]


def test_compare_distances(tmp_path):
    a = make_checkpoint(tmp_path / "_x01-a.safetensors", "sd1", factor=32, seed=1)
    b = make_checkpoint(tmp_path / "_x02-b.safetensors", "sd1", factor=32, seed=2)
    res = pool.compare([a, b], distances=True, reference=0)
    d = res["components"]["vae"]["relative_l2"]
    ca, cb = am.Checkpoint(a), am.Checkpoint(b)
    keys = [k for k in ca.keys() if k.startswith("first_stage_model.") and ca.info[k].is_float]
    num = sum(float(np.sum((cb.tensor(k).astype(np.float64) - ca.tensor(k).astype(np.float64)) ** 2)) for k in keys)
    den = sum(float(np.sum(ca.tensor(k).astype(np.float64) ** 2)) for k in keys)
    assert d[str(a)] == 0.0 and d[str(b)] == pytest.approx(np.sqrt(num / den), rel=1e-12)


def test_inspect_escapes_hostile_metadata(tmp_path):
    state = make_state("sd1", factor=32)
    save(tmp_path / "evil.safetensors", state, {"title": "ok\x1b[2J\x1b]0;pwned\x07\u202e", "sd_merge_recipe": "x" * 10000})
    text = _cli_out(["inspect", str(tmp_path / "evil.safetensors")])
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    info = json.loads(_cli_out(["inspect", str(tmp_path / "evil.safetensors"), "--json"]))[0]
    assert "\\x1b[2J" in info["metadata"]["title"] and len(info["metadata"]["sd_merge_recipe"]) < 500


def test_inspect_counts_nan(tmp_path):
    state = make_state("sd1", factor=32)
    k = "first_stage_model.decoder.conv_in.bias"
    v = state[k].copy()
    v[:2] = np.nan
    v[2] = np.inf
    state[k] = v
    save(tmp_path / "n.safetensors", state)
    info = json.loads(_cli_out(["inspect", str(tmp_path / "n.safetensors"), "--nan", "--json"]))[0]
    assert info["nonfinite"]["vae"] == {"nan": 2, "inf": 1} and info["nonfinite"]["unet"] == {"nan": 0, "inf": 0}


def test_export_ema(tmp_path):
    p = make_checkpoint(tmp_path / "m.safetensors", "sd1", factor=32, ema=True)
    tk.export(p, "ema", tmp_path / "ema.safetensors")
    a = detect(am.Checkpoint(tmp_path / "ema.safetensors"))
    assert a.components["unet"].tensors == 686 and not a.components["unet"].missing
