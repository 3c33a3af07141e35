"""Hostile and unlucky inputs (issue 9, the parts done so far): only regular files are opened, a
FIFO never blocks, thread and chunk counts are bounded, and none of these leaves an output."""

from __future__ import annotations

import os
import subprocess
import sys

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.cli import main
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import AstolfomixError, PlanError


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "_x03-x.safetensors"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(AstolfomixError, match="not a regular file"):
            am.Checkpoint(path)
    # The CLI, in a child with a deadline: a blocking open would hang here.
    for cmd in (["inspect", str(fifo)], ["hash", str(fifo)]):
        r = subprocess.run([sys.executable, "-m", "astolfomix_rs.cli", *cmd], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "not a regular file" in r.stderr, (cmd, r.stderr)


@pytest.mark.parametrize("value", ["0", "-1", "10000", "abc"])
def test_bad_thread_counts_are_error_lines(tmp_path, capsys, value):
    save(tmp_path / "a.safetensors", {"w": np.ones(4, np.float32)})
    with pytest.raises(SystemExit) as ei:
        main(["mean", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--threads", value])
    assert ei.value.code == 2
    assert "--threads" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_api_bounds_threads_and_chunk_before_writing(tmp_path):
    save(tmp_path / "a.safetensors", {"w": np.ones(4, np.float32)})
    for kw in ({"threads": 5000}, {"chunk": 2**62}):
        with pytest.raises(PlanError):
            am.mean([tmp_path / "a.safetensors"], tmp_path / "o.safetensors", progress=False, **kw)
        assert not (tmp_path / "o.safetensors").exists()
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_links_out_of_the_models_folder_are_refused(tmp_path):
    from astolfomix_rs.commands import mecha as mc
    from astolfomix_rs.commands.recipe import scan_pool
    from astolfomix_rs.errors import RecipeError

    outside, pool = tmp_path / "elsewhere", tmp_path / "pool"
    outside.mkdir()
    pool.mkdir()
    save(outside / "secret.safetensors", {"w": np.ones(2, np.float32)})
    save(pool / "inside.safetensors", {"w": np.ones(2, np.float32)})
    (pool / "_x01-link.safetensors").symlink_to(outside / "secret.safetensors")
    (pool / "ok.safetensors").symlink_to(pool / "inside.safetensors")  # a link that stays inside is fine
    with pytest.raises(RecipeError, match="outside"):
        scan_pool(pool)
    (pool / "_x01-link.safetensors").unlink()
    (pool / "l.safetensors").symlink_to(outside / "secret.safetensors")
    for name, ok in (("l.safetensors", False), ("ok.safetensors", True)):
        text = f'version 0.1.0\nmodel "{name}" model_config="sdxl-sgm" merge_space="weight"\n'
        if ok:
            mc.mecha_plan(mc.parse_mecha(text), pool)
        else:
            with pytest.raises(RecipeError, match="link to"):
                mc.mecha_plan(mc.parse_mecha(text), pool)
    assert scan_pool(pool) == {}


def test_weights_that_would_overflow_are_refused(tmp_path, capsys):
    for i in range(3):
        save(tmp_path / f"{i}.safetensors", {"w": np.ones(4, np.float32)})
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    with pytest.raises(PlanError, match="overflow"):
        am.mean(files, tmp_path / "o.safetensors", weights=[1e300, -1e300, 1], progress=False)
    with pytest.raises(PlanError, match="overflow"):
        am.mean(files, tmp_path / "o.safetensors", weights=[1e7, 1, 1], normalize_weights=False, progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    am.mean(files, tmp_path / "o.safetensors", weights=[2, -1, 0.5], progress=False)  # extrapolation is fine
    for bad in ("abc", "1,nan"):
        with pytest.raises(SystemExit):
            main(["mean", *map(str, files), "-o", str(tmp_path / "p.safetensors"), "--weights", bad])
        assert "--weights" in capsys.readouterr().err


TERM = """
import os, signal, sys
import astolfomix_rs.cli as cli
orig, sent = cli.mean, []
def mean(*a, **k):
    def tick(done, total):
        if not sent:  # once the engine is under way, as `kill` or a closing terminal would
            sent.append(1)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return orig(*a, **{**k, "progress": tick, "threads": 1, "chunk": 64, "kernel": "scalar"})
cli.mean = mean
sys.exit(cli.main(["mean", *sys.argv[2:-1], "-o", sys.argv[-1], "--no-fsync"]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c_and_leave_nothing(tmp_path, sig):
    files = []
    for i in range(4):
        p = tmp_path / f"{i}.safetensors"
        save(p, {f"w{k}": np.full(2_000_000, i, np.float32) for k in range(8)}, durable=False)
        files.append(str(p))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", TERM, sig, *files, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "interrupted" in r.stderr, (r.returncode, r.stderr)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)


def test_transformers_export_keeps_an_existing_config_and_names_its_dtype(tmp_path):
    import json

    from astolfomix_rs.commands import components as tk
    from astolfomix_rs.errors import OutputError
    from astolfomix_rs.tools.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "sd.safetensors", "sd1", factor=32)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        tk.export(src, "te0", hf, layout="transformers")
    assert (hf / "config.json").read_text() == "mine" and not (hf / "model.safetensors").exists()
    tk.export(src, "te0", hf, layout="transformers", overwrite=True)
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float16"
    tk.export(src, "te0", tmp_path / "hf32", layout="transformers", dtype="f32")
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]


# --- Inputs that change while they are read (2) -------------------------------------------------

def _truncate(path, n: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(n)


def _two_inputs(tmp_path):
    files = []
    for i in range(2):
        p = tmp_path / f"{i}.safetensors"
        save(p, {"a": np.full(100_000, i, np.float32), "b": np.full(300_000, i, np.float16)}, durable=False)
        files.append(p)
    return files


@pytest.mark.parametrize("io", ["pread", "mmap", "auto"])
def test_an_input_truncated_after_opening_is_reported_by_the_engine(tmp_path, io):
    from astolfomix_rs import _core
    from astolfomix_rs.core.plan import mean_plan
    from astolfomix_rs.errors import AstolfomixIOError

    files = _two_inputs(tmp_path)
    layout = mean_plan([am.Checkpoint(f) for f in files]).resolve()
    size = os.path.getsize(files[1])
    _truncate(files[1], size // 2)  # reads past the new end: SIGBUS through a map, EOF with pread
    with pytest.raises(AstolfomixIOError, match=rf"changed while it was read \(now {size // 2} bytes, expected {size}\)"):
        _core.execute(layout, str(tmp_path / "o.safetensors"), io=io, durable=False)
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "1.safetensors"]


@pytest.mark.parametrize("io", ["pread", "mmap", "auto"])
def test_an_input_truncated_under_a_robust_merge_is_reported(tmp_path, io):
    # Robust tensors are read in several passes (through the map under "auto"): a read past
    # the new end must fail the run, not merge zeros.
    from astolfomix_rs import _core
    from astolfomix_rs.commands import mecha as mc
    from astolfomix_rs.errors import AstolfomixIOError

    files = _two_inputs(tmp_path)
    text = "\n".join([
        "version 0.1.0",
        *[f'model "{f.name}" model_config="sdxl-sgm" merge_space="weight"' for f in files],
        "merge \"subtract\" &1 &0",
        "merge \"ties_sum_with_dropout\" &2 probability=0.1 della_eps=-0.1 rescale=false k=1.0 "
        "vote_sgn=true apply_median=true seed=0",
        "merge \"add_difference\" &0 &3 alpha=1.0",
    ])
    plan, _ = mc.mecha_plan(mc.parse_mecha(text), tmp_path, dtype="f32")
    layout = plan.resolve()
    size = os.path.getsize(files[1])
    _truncate(files[1], size // 2)
    with pytest.raises(AstolfomixIOError, match=rf"changed while it was read \(now {size // 2} bytes, expected {size}\)"):
        _core.execute(layout, str(tmp_path / "o.safetensors"), io=io, durable=False)
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "1.safetensors"]


def test_hash_compare_metric_and_tensor_reads_report_a_truncated_input(tmp_path):
    from astolfomix_rs import _core
    from astolfomix_rs.commands.pool import compare
    from astolfomix_rs.errors import AstolfomixIOError
    from astolfomix_rs.tools.synth import make_checkpoint

    a = make_checkpoint(tmp_path / "a.safetensors", "sd1", factor=32, seed=1)
    b = make_checkpoint(tmp_path / "b.safetensors", "sd1", factor=32, seed=2)
    ck = am.Checkpoint(a)
    keys = [k for k in ck.keys() if ck.info[k].is_float]
    _truncate(a, ck.data_start + 1000)
    match = "changed while it was read"
    with pytest.raises(AstolfomixIOError, match=match):
        _core.file_hashes([ck._core])
    with pytest.raises(AstolfomixIOError, match=match):
        _core.sigmoid_sums(ck._core, keys)
    with pytest.raises(AstolfomixIOError, match=match):
        _core.content_hashes(ck._core, {"all": [(k, k) for k in keys]})
    with pytest.raises(AstolfomixIOError, match=match):
        _core.l2_distances([ck._core, am.Checkpoint(b)._core], keys)
    with pytest.raises(AstolfomixIOError, match=match):
        ck.tensor(keys[-1])  # inspect --nan and the anatomy read tensors this way
    # compare opens its own handles: a file truncated before it starts is refused at open.
    with pytest.raises(AstolfomixError):
        compare([a, b], distances=True)


def test_the_torch_path_reports_a_truncated_input(tmp_path):
    pytest.importorskip("torch")
    from astolfomix_rs.core.engine import execute
    from astolfomix_rs.core.plan import mean_plan
    from astolfomix_rs.errors import AstolfomixIOError

    files = _two_inputs(tmp_path)
    size = os.path.getsize(files[1])
    calls = []

    def tick(done, total):  # after the first tensor: the second one lies past the new end
        if not calls:
            calls.append(1)
            _truncate(files[1], size // 2)

    with pytest.raises(AstolfomixIOError, match="changed while it was read"):
        execute(mean_plan([am.Checkpoint(f) for f in files]), tmp_path / "o.safetensors", device="torch-cpu", progress=tick, durable=False)
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "1.safetensors"]


# --- Signals and leftovers (3) ------------------------------------------------------------------

KILL = """
import os, signal, sys
from astolfomix_rs import Checkpoint
from astolfomix_rs.core.engine import execute
from astolfomix_rs.core.plan import mean_plan
def tick(done, total):
    os.kill(os.getpid(), signal.SIGKILL)  # nothing can clean up after this
execute(mean_plan([Checkpoint(f) for f in sys.argv[1:3]]), sys.argv[3], device="torch-cpu", progress=tick)
"""


def test_temp_files_of_killed_runs_are_removed_by_the_next_run_and_by_clean(tmp_path, capsys):
    pytest.importorskip("torch")
    files = [str(p) for p in _two_inputs(tmp_path)]
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", KILL, *files, str(out)], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    stale = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(stale) == 1 and ".astolfomix-" in stale[0]
    assert main(["clean", str(tmp_path)]) == 0
    assert "1 leftover temp files" in capsys.readouterr().out
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    r = subprocess.run([sys.executable, "-c", KILL, *files, str(out)], capture_output=True, timeout=120)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    am.mean(files, out, progress=False)  # a later run in the same folder clears them
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_interrupt_after_the_rename_says_the_output_was_written(tmp_path, capsys, monkeypatch):
    import astolfomix_rs.cli as cli

    files = [str(p) for p in _two_inputs(tmp_path)]

    def late(r):  # Ctrl-C landing as the engine returns, after the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "report_text", late)
    out = tmp_path / "o.safetensors"
    assert main(["mean", *files, "-o", str(out), "--no-fsync"]) == 130
    err = capsys.readouterr().err
    assert out.exists() and f"interrupted after writing {out}" in err and "no output was written" not in err, err


# --- Targets (4) --------------------------------------------------------------------------------

def test_output_names_up_to_255_bytes_work(tmp_path):
    files = _two_inputs(tmp_path)
    name = "m" * 243 + ".safetensors"
    assert len(name) == 255
    am.mean(files, tmp_path / name, progress=False)
    assert am.Checkpoint(tmp_path / name).keys() == ["a", "b"]


def test_a_transformers_export_that_fails_leaves_no_folder(tmp_path, monkeypatch):
    from astolfomix_rs.commands import components as tk
    from astolfomix_rs.errors import DiskFullError
    from astolfomix_rs.tools.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "sd.safetensors", "sd1", factor=32)

    def full(path, text, overwrite):
        raise DiskFullError(f"{path}: No space left on device")

    monkeypatch.setattr(tk, "save_text", full)
    with pytest.raises(DiskFullError):
        tk.export(src, "te0", tmp_path / "hf", layout="transformers")
    assert sorted(os.listdir(tmp_path)) == ["sd.safetensors"]
    (tmp_path / "old").mkdir()
    with pytest.raises(DiskFullError):
        tk.export(src, "te0", tmp_path / "old", layout="transformers")
    assert os.listdir(tmp_path / "old") == []  # the weights written before the config went again


# --- Validation where inputs enter (5) ----------------------------------------------------------

def _raw_file(path, header: dict, data: bytes = b"") -> None:
    import json
    import struct

    b = json.dumps(header).encode()
    b += b" " * (-len(b) % 8)
    path.write_bytes(struct.pack("<Q", len(b)) + b + data)


def test_dimensions_no_reader_can_hold_are_refused(tmp_path, capsys):
    p = tmp_path / "huge.safetensors"
    _raw_file(p, {"model.diffusion_model.x": {"dtype": "F16", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]}})
    assert main(["inspect", "--nan", str(p)]) == 2
    assert "2^63-1" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [[5], [], [0, 4]])
def test_a_unet_key_of_the_wrong_rank_is_an_error_line(tmp_path, capsys, shape):
    from astolfomix_rs.tools.synth import make_state

    st = make_state("sd1", factor=32, only=("diffuser",))
    key = next(k for k in st if k.endswith("attn2.to_k.weight"))
    st = {k: v for k, v in st.items() if k.endswith("attn2.to_k.weight") or not k.endswith(".weight") or k != key}
    st[key] = np.ones(shape, np.float16)
    p = tmp_path / "u.safetensors"
    save(p, st)
    for cmd in (["inspect", str(p)], ["hash", str(p)], ["compare", str(p), str(p)]):
        assert main(cmd) == 2, cmd
        assert "non-empty matrix" in capsys.readouterr().err
    # A mean takes any safetensors file: the odd key only leaves the architecture unknown.
    am.mean([p], tmp_path / "o.safetensors", progress=False)
    assert am.Checkpoint(tmp_path / "o.safetensors").metadata["modelspec.architecture"] == "unknown"


def test_long_recipes_are_stored_truncated_with_their_sha256(tmp_path):
    import hashlib

    from astolfomix_rs.commands import recipe as rc
    from astolfomix_rs.core.engine import execute
    from astolfomix_rs.tools.synth import make_checkpoint

    for i in (1, 2):
        make_checkpoint(tmp_path / f"_x0{i}-m.safetensors", "sdxl", factor=32, seed=i)
    text = "unet: 01,02\nmain=out.safetensors\n" + "a label line that goes on and on\n" * 100_000  # 3.3 MB
    plan, summary = rc.merge_plan(rc.parse_grid(text), tmp_path, output="main")
    execute(plan, tmp_path / "out.safetensors", progress=False)
    meta = am.Checkpoint(tmp_path / "out.safetensors").metadata
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert meta["astolfomix.recipe_sha256"] == digest
    assert len(meta["astolfomix.recipe"]) < 1.1e6 and meta["astolfomix.recipe"].endswith(f"sha256 {digest})")
    from safetensors import safe_open  # another reader accepts the header

    with safe_open(str(tmp_path / "out.safetensors"), "np") as f:
        assert len(list(f.keys())) > 100


def test_a_header_over_the_readers_limit_is_refused_before_writing(tmp_path):
    from astolfomix_rs.core.engine import execute
    from astolfomix_rs.core.plan import Output, Plan

    p = tmp_path / "a.safetensors"
    save(p, {"w": np.ones(4, np.float32)})
    plan = Plan([am.Checkpoint(p)], [Output("w", "copy", [(0, "w")])], metadata={"big": "x" * 100_000_001})
    with pytest.raises(PlanError, match="over the 100000000-byte limit"):
        execute(plan, tmp_path / "o.safetensors", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("types.toml", '[outputs]\nmain = 5.5\n[components.unet]\nmodels = ["01"]\n', "expected a string"),
    ("types2.toml", '[components.unet]\nmodels = [true]\n', "expected a string"),
    ("types3.toml", '[components.unet]\nmodels = ["01"]\nweights = ["x"]\n', "list of numbers"),
    ("types4.toml", 'models = 3\n', "expected a table"),
    ("count.txt", "unet: 01=" + "9" * 5000 + "\nmain=o.safetensors\n", "not a model number"),
    ("id.txt", "unet: " + "9" * 5000 + "\nmain=o.safetensors\n", "not a model number"),
])
def test_recipe_values_of_the_wrong_type_or_size_are_error_lines(tmp_path, capsys, name, text, needle):
    from astolfomix_rs.tools.synth import make_checkpoint

    make_checkpoint(tmp_path / "_x01-m.safetensors", "sdxl", factor=32)
    (tmp_path / name).write_text(text)
    assert main(["merge", str(tmp_path / name), "--models", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err) < 1000, err


def test_threads_above_the_machines_are_capped_and_said_once(tmp_path, capsys):
    files = [str(p) for p in _two_inputs(tmp_path)]
    assert main(["mean", *files, "-o", str(tmp_path / "o.safetensors"), "--threads", "1000", "--json"]) == 0
    out = capsys.readouterr()
    import json

    assert json.loads(out.out)["threads"] <= (os.cpu_count() or 1)
    assert out.err.count("capped to") == 1


# --- Escapes (6) --------------------------------------------------------------------------------

def test_terminal_escapes_from_recipes_names_and_headers_are_shown_escaped(tmp_path, capsys):
    from astolfomix_rs.tools.synth import make_checkpoint

    make_checkpoint(tmp_path / "_x01-a\x1b[2Jb.safetensors", "sdxl", factor=32)
    (tmp_path / "r.txt").write_text("unet: 01\nmain=o\x1b]0;pwned\x07.safetensors\n")
    assert main(["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path), "--dry-run"]) == 0
    bad = tmp_path / "x.safetensors"
    _raw_file(bad, {"w\x1b[31m": {"dtype": "F16\x1b[0m", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
    assert main(["inspect", str(bad)]) == 2
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\x07" not in out.out + out.err
    assert "\\x1b]0;pwned\\x07" in out.out and "\\x1b[2J" in out.out and "\\x1b[0m" in out.err


# --- compare --distance streams (7) -------------------------------------------------------------

RSS = """
import sys, threading, time
from astolfomix_rs.cli import main
peak, done = [0], []
def watch():  # peak RssAnon: the process's own memory (mapped file pages are the page cache's)
    while not done:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.005)
t = threading.Thread(target=watch)
t.start()
code = main(["compare", "--distance", *sys.argv[1:]])
done.append(1)
t.join()
print(code, peak[0])
"""


def test_compare_distance_memory_is_a_block_of_each_file_not_whole_tensors(tmp_path):
    from astolfomix_rs.tools.synth import make_state

    # 16 files whose TE holds one 64 MB tensor: holding it whole in f64 for every file is 8 GB.
    base = make_state("sd1", factor=32, only=("clip_l",))
    key = next(k for k in base if k.endswith("token_embedding.weight"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(16):
        st = dict(base)
        st[key] = (rng.integers(0, 1 << 16, size=(32_768, 1024), dtype=np.uint16) & np.uint16(0xB7FF)).view(np.float16)
        p = tmp_path / f"{i}.safetensors"
        save(p, st, durable=False)
        files.append(str(p))
        del st
    r = subprocess.run([sys.executable, "-c", RSS, *files], capture_output=True, text=True, timeout=600)
    code, peak_kb = map(int, r.stdout.split()[-2:])
    assert code == 0, r.stderr
    assert peak_kb < 1_000_000, f"peak RssAnon {peak_kb / 1e6:.2f} GB"


# --- No traceback from any command (8) -----------------------------------------------------------

def test_os_errors_and_bugs_are_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import astolfomix_rs.cli as cli
    from astolfomix_rs.cli.common import COMMANDS

    (tmp_path / "file").write_text("x")
    assert main(["demo", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astolfomix demo: error: ") and err.count("\n") == 1, err

    def broken(args):
        raise ValueError("boom")

    monkeypatch.setitem(COMMANDS, "hash", broken)
    assert cli.main(["hash", "x"]) == 3
    err = capsys.readouterr().err
    assert "internal error: ValueError: boom" in err and "Traceback" not in err
    monkeypatch.setenv("ASTOLFOMIX_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.main(["hash", "x"])
