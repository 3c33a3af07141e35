"""The grid notation, the TOML form, model resolution and the one-pass merge."""

from __future__ import annotations

import json

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.commands import recipe as rc
from astolfomix_rs.errors import RecipeError
from astolfomix_rs.tools.synth import make_checkpoint
from reference import emulate_mean

EXAMPLE = """\
```
te0: 01,--,03,--,05a,--=3
te1: 01,02,--,04,05a,06=5
=sd: --,-02,--,04,--,--
7te0

te0:01,--,03,04,--,06
te1: --,02,03,--,05a,06=4

x02te1-AstolfoMix-_x01_x02

unet: 01,02,--,04,--,06,07,08=6
alt:  01,--,03,04,--,--,07,--=4
x01a: 01,02,--,--,--,--,07,08

main=x05-AstolfoMix-x03te0x03te1.safetensors
alt=x03b-AstolfoMix-x03te0x03te1.safetensors
```
"""


def ids(sel, pool=()):
    return [str(m) for m in sel.selected(pool)]


def test_example_recipe():
    r = rc.parse_grid(EXAMPLE)
    comps = r.components("main")
    assert ids(comps["te0"]) == ["01", "03", "04", "06"]
    assert ids(comps["te1"]) == ["02", "03", "05a", "06"]
    assert ids(comps["unet"]) == ["01", "02", "04", "06", "07", "08"]
    assert ids(r.components("alt")["unet"]) == ["01", "03", "04", "07"]  # same-named line is the UNET
    assert r.outputs == {"main": "x05-AstolfoMix-x03te0x03te1.safetensors", "alt": "x03b-AstolfoMix-x03te0x03te1.safetensors"}
    assert any("'te0' redefined" in n for n in r.notes) and any("'te1' redefined" in n for n in r.notes)
    sd = r.selections["=sd"]  # '=' may start a name; '-02' is flagged, not selected
    assert ids(sd) == ["04"] and [i.kind for i in sd.items if i.kind != "placeholder"] == ["flagged", "model"]
    labels = [o for k, o in r.lines if k == "label"]
    assert "7te0" in labels and "x02te1-AstolfoMix-_x01_x02" in labels and "```" in labels


def test_format_round_trips():
    r = rc.parse_grid(EXAMPLE)
    again = rc.parse_grid(r.format())
    assert again.outputs == r.outputs
    for name, sel in r.selections.items():
        assert ids(again.selections[name]) == ids(sel) and again.selections[name].count == sel.count


def test_without_fences_spaces_and_widths():
    r = rc.parse_grid("unet:001, 2 ,---,10a=3\nte: 07\n")
    assert ids(r.selections["unet"]) == ["01", "02", "10a"]
    assert rc.ModelId.parse("007") == rc.ModelId.parse("7")


def test_aliases():
    r = rc.parse_grid("clip_l: 01,02\nclip_g: 03\n")
    c = r.components()
    assert ids(c["te0"]) == ["01", "02"] and ids(c["te1"]) == ["03"]


def test_exclusion_list():
    r = rc.parse_grid("te1: 02,05=-2\n")
    pool = [rc.ModelId(i) for i in range(1, 7)] + [rc.ModelId(5, "a")]
    assert ids(r.selections["te1"], pool) == ["01", "03", "04", "06"]


@pytest.mark.parametrize("text,needle", [
    ("unet: 01,02=3", "count =3 but 2 models are selected"),
    ("unet: 01,02=-3", "count =-3 but 2 models are listed"),
    ("unet: 01,02,1", "model 01 is listed twice"),
    ("unet: 01,,02", "empty item"),
    ("unet: 01,abc", "'abc' is not a model number"),
    ("unet: ", "no items"),
])
def test_errors_name_line_and_problem(text, needle):
    with pytest.raises(RecipeError) as ei:
        rc.parse_grid("te0: 01\n\n" + text + "\n")
    msg = str(ei.value)
    assert msg.startswith("line 3:") and needle in msg and text.strip() in msg


def test_output_line_with_colon_in_file_and_labels():
    r = rc.parse_grid("main=mix:v2.safetensors\nhello world\n")
    assert r.outputs == {"main": "mix:v2.safetensors"}


def test_toml_recipe():
    r = rc.parse_toml("""
base = "01"
dtype = "bf16"
[outputs]
main = "out.safetensors"
[models]
"3" = "renamed/three.safetensors"
[components.unet]
models = ["01", "02", "03"]
weights = [1, 1, 2]
[components.clip_l]
models = ["02"]
""")
    assert r.base == "01" and r.dtype == "bf16" and r.weights["unet"] == [1, 1, 2]
    assert ids(r.components()["te0"]) == ["02"] and r.table["3"] == "renamed/three.safetensors"
    with pytest.raises(RecipeError, match="weights for"):
        rc.parse_toml("[components.unet]\nmodels=['01','02']\nweights=[1]\n")
    with pytest.raises(RecipeError, match="TOML"):
        rc.parse_toml("[components\n")


# ---------------------------------------------------------------------------------------------
# Resolution and merge


def make_pool(folder, n=8, factor=64, extra=()):
    for i in range(1, n + 1):
        make_checkpoint(folder / f"_x{i:02d}-model{i}.safetensors", "sdxl", factor=factor, seed=i)
    for name, seed in extra:
        make_checkpoint(folder / name, "sdxl", factor=factor, seed=seed)


def test_untrusted_recipe_cannot_escape(tmp_path):
    make_pool(tmp_path, 2)
    r = rc.parse_grid("unet: 01,02\nmain=../../evil.safetensors\n")
    with pytest.raises(RecipeError, match="plain file name"):
        rc.merge_plan(r, tmp_path)
    r = rc.parse_toml('[models]\n"1" = "../../etc/passwd"\n[components.unet]\nmodels=["01"]\n')
    with pytest.raises(RecipeError, match="outside"):
        rc.merge_plan(r, tmp_path)
    r = rc.parse_toml('[models]\n"1" = "/etc/passwd"\n[components.unet]\nmodels=["01"]\n')
    with pytest.raises(RecipeError, match="inside"):
        rc.merge_plan(r, tmp_path)


def test_every_problem_listed_before_writing(tmp_path):
    make_pool(tmp_path, 3)
    make_checkpoint(tmp_path / "_x03-duplicate.safetensors", "sdxl", factor=64, seed=9)
    make_checkpoint(tmp_path / "_x04-sd1.safetensors", "sd1", factor=64, seed=4)
    make_checkpoint(tmp_path / "_x05-shrunk-differently.safetensors", "sdxl", factor=32, seed=5)
    (tmp_path / "_x06-broken.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    r = rc.parse_grid("unet: 01,02,03,04,05,06,09=7\n")
    with pytest.raises(rc.MergeProblems) as ei:
        rc.merge_plan(r, tmp_path)
    msg = str(ei.value)
    assert "model 03: 2 files match" in msg
    assert "model 09: no file _x09-*" in msg
    assert "sd1" in msg and "_x04-sd1" in msg
    assert "_x05-shrunk-differently" in msg and "more problems in" in msg and "shape [" in msg
    assert "_x06-broken" in msg and "JSON" in msg
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("_x")]


def test_merge_40_models_bit_identical_per_component(tmp_path):
    n = 42
    make_pool(tmp_path, n, factor=64, extra=[("x05a-_x09_x10.safetensors", 510), ("x11a-_x11_x12.safetensors", 511)])
    unet = [f"{i:02d}" for i in range(1, 33)]
    te0 = [f"{i:02d}" for i in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25)] + ["05a"]
    te1_excl = ["02", "04", "06"]
    text = (f"unet: {','.join(unet)}={len(unet)}\n"
            f"te0: {','.join(te0)}={len(te0)}\n"
            f"te1: {','.join(te1_excl)}=-3\n"
            "main=x31-AstolfoMix-x13te0x38te1.safetensors\n")
    (tmp_path / "r.txt").write_text(text)
    r = rc.load(tmp_path / "r.txt")
    plan, summary = rc.merge_plan(r, tmp_path, base="40", hash_inputs=True)
    assert summary["counts"] == {"unet": 32, "te0": 14, "te1": 39}
    out = tmp_path / summary["output_name"]
    rep = am.execute(plan, out, progress=False)
    # every input byte read once: exactly the bytes of the selected tensors
    cks = {p.name: am.Checkpoint(p) for p in tmp_path.glob("*x*-*.safetensors") if p != out}
    base = cks["_x40-model40.safetensors"]
    from astolfomix_rs.models.anatomy import detect

    an = detect(base)
    sel = {"unet": [f"_x{i:02d}-model{i}.safetensors" for i in range(1, 33)],
           "te0": [f"_x{int(i):02d}-model{int(i)}.safetensors" for i in te0[:-1]] + ["x05a-_x09_x10.safetensors"],
           "te1": [f"_x{i:02d}-model{i}.safetensors" for i in range(1, n + 1) if i not in (2, 4, 6)]}
    expect_read = sum(cks[f].info[k].nbytes for c, files in sel.items() for k in an.components[c].keys
                      if base.info[k].is_float for f in files)
    expect_read += sum(t.nbytes for k, t in base.info.items()
                       if an.component_of(k) in (None, "vae") or not t.is_float)
    assert rep.bytes_read == expect_read
    res = am.Checkpoint(out)
    for c, files in sel.items():
        for k in an.components[c].keys:
            if not base.info[k].is_float:
                continue
            raws = [(np.array(cks[f].raw(k)), cks[f].info[k].dtype) for f in files]
            expect = emulate_mean(raws, "F16")
            assert res.raw(k).tobytes() == expect.tobytes(), (c, k)
    for k in an.components["vae"].keys:
        assert res.raw(k).tobytes() == base.raw(k).tobytes()
    pid = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    assert res.raw(pid).tobytes() == base.raw(pid).tobytes()
    md = res.metadata
    merge = json.loads(md["astolfomix.merge"])
    assert merge["counts"] == {"unet": 32, "te0": 14, "te1": 39} and merge["base"] == "_x40-model40.safetensors"
    assert len(merge["components"]["te1"]) == 39 and "x05a-_x09_x10.safetensors" in merge["components"]["te0"]
    webui = json.loads(md["sd_merge_models"])
    assert len(webui) == len(plan.inputs) and all(len(k) == 64 and "legacy_hash" in v for k, v in webui.items())
    assert json.loads(md["sd_merge_recipe"])["recipe"] == text
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_peak_anon_memory_does_not_grow_with_n(tmp_path):
    import sys

    from astolfomix_rs.tools.bench import run_sampled

    make_pool(tmp_path, 24, factor=16)
    script = (
        "import sys, astolfomix_rs as am\n"
        "from astolfomix_rs.commands import recipe as rc\n"
        "plan, s = rc.merge_plan(rc.parse_grid(sys.argv[1]), sys.argv[2])\n"
        "r = am.execute(plan, sys.argv[3], progress=False, durable=False, overwrite=True)\n"
        "print(r.bytes_read)\n"
    )
    peaks, reads = {}, {}
    for n in (4, 24):
        text = "unet: " + ",".join(f"{i:02d}" for i in range(1, n + 1)) + "\nte0: 01\n"
        out, err, rc_, peak = run_sampled([sys.executable, "-c", script, text, str(tmp_path), str(tmp_path / "o.safetensors")])
        assert rc_ == 0, err
        peaks[n], reads[n] = peak, int(out)
    # RssAnon (not mapped file pages). Data never lands in anonymous memory; headers are parsed one
    # input at a time. What grows is the plan itself: one source entry per key and input (2527 SDXL
    # keys, about 0.2 MB per input whatever its size) against 27 MB of tensor data per input here.
    assert reads[24] > 4 * reads[4]
    input_kb = (tmp_path / "_x05-model5.safetensors").stat().st_size / 1024
    per_input_kb = (peaks[24] - peaks[4]) / 20
    assert per_input_kb < 512 and per_input_kb < 0.02 * input_kb, peaks


def test_dry_run_cli(tmp_path, capsys):
    from astolfomix_rs.cli import main

    make_pool(tmp_path, 4)
    (tmp_path / "r.txt").write_text("unet: 01,02,03=3\nte0: 04\n")
    assert main(["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path), "--dry-run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["counts"] == {"unet": 3, "te0": 1} and d["output_name"] == "x2-AstolfoMix-x0te0.safetensors"
    assert not (tmp_path / d["output_name"]).exists()
    assert main(["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path), "--base", "04"]) == 0
    assert (tmp_path / d["output_name"]).exists()
    assert main(["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_shows_toml_weights_and_output_defaults_to_the_first(tmp_path, capsys):
    from astolfomix_rs.cli import main
    from astolfomix_rs.tools.synth import make_checkpoint

    for i in (1, 2, 3):
        make_checkpoint(tmp_path / f"_x0{i}-m.safetensors", "sdxl", factor=32, seed=i)
    (tmp_path / "r.toml").write_text('[outputs]\nmain = "a.safetensors"\nother = "b.safetensors"\n'
                                     '[components.unet]\nmodels = ["01", "02", "03"]\nweights = [1, 1, 2]\n')
    assert main(["merge", str(tmp_path / "r.toml"), "--models", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "unet: weighted mean of 3:" in out and "(weights 1, 1, 2, normalised to sum 1)" in out
    assert "a.safetensors" in out and "building output 'main', the first of main, other" in out


def test_a_many_line_error_prints_one_problem_per_line(tmp_path, capsys):
    from astolfomix_rs.cli import main

    (tmp_path / "r.txt").write_text("unet: 01,02\nmain=o.safetensors\n")
    assert main(["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("astolfomix merge: error: cannot merge"), err
    assert any(line.strip().startswith("model 01: no file _x01-") for line in err[1:]), err
    assert not any("\\n" in line for line in err), err  # lines, not escaped newlines
