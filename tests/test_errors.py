"""Every bad input gets its exception class, a message naming the file (and tensor), and leaves
no output or temporary file behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import (
    AstolfomixError,
    DiskFullError,
    InputNotFoundError,
    InvalidFileError,
    MismatchError,
    OutputError,
    PlanError,
)
from conftest import leftovers
from hypothesis import given, settings
from hypothesis import strategies as st


def raw_file(path, header: dict | bytes, data: bytes = b"", declared_len: int | None = None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path


def good(tmp_path, name="good.safetensors"):
    p = tmp_path / name
    save(p, {"w": np.ones(4, np.float16)}, overwrite=True)
    return p


def check_bad(tmp_path, bad, exc, *needles):
    """A merge of a good file and ``bad`` raises ``exc`` naming the file; nothing is left behind."""
    g = good(tmp_path)
    before = leftovers(tmp_path)
    with pytest.raises(exc) as ei:
        am.mean([g, bad], tmp_path / "out.safetensors", progress=False)
    msg = str(ei.value)
    assert os.path.basename(str(bad)) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert leftovers(tmp_path) == before
    assert isinstance(ei.value, AstolfomixError)
    return msg


def entry(dtype="F16", shape=(4,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def test_truncated_file(tmp_path):
    g = good(tmp_path, "src.safetensors")
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(g.read_bytes()[:-3])
    check_bad(tmp_path, bad, InvalidFileError, "truncated")


def test_header_longer_than_file(tmp_path):
    bad = raw_file(tmp_path / "long.safetensors", {"w": entry()}, b"\0" * 8, declared_len=10_000)
    check_bad(tmp_path, bad, InvalidFileError, "past the end")


def test_tiny_file(tmp_path):
    bad = tmp_path / "tiny.safetensors"
    bad.write_bytes(b"\x01\x02")
    check_bad(tmp_path, bad, InvalidFileError, "shorter")


def test_non_json_header(tmp_path):
    bad = raw_file(tmp_path / "nj.safetensors", b"{this is not json}")
    check_bad(tmp_path, bad, InvalidFileError, "JSON")


def test_overlapping_offsets(tmp_path):
    bad = raw_file(tmp_path / "ov.safetensors", {"w": entry(offs=(0, 8)), "v": entry(offs=(4, 12))}, b"\0" * 12)
    check_bad(tmp_path, bad, InvalidFileError, "overlaps", "'v'")


def test_out_of_range_offsets(tmp_path):
    bad = raw_file(tmp_path / "oor.safetensors", {"w": entry(offs=(0, 8))}, b"\0" * 4)
    check_bad(tmp_path, bad, InvalidFileError)


def test_shape_size_disagreement(tmp_path):
    bad = raw_file(tmp_path / "ss.safetensors", {"w": entry(shape=(5,), offs=(0, 8))}, b"\0" * 8)
    check_bad(tmp_path, bad, InvalidFileError, "'w'", "needs 10 bytes")


def test_unknown_dtype(tmp_path):
    bad = raw_file(tmp_path / "ud.safetensors", {"w": entry(dtype="Q4_K")}, b"\0" * 8)
    check_bad(tmp_path, bad, InvalidFileError, "unknown dtype 'Q4_K'")


def test_duplicate_keys(tmp_path):
    h = b'{"w":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"w":{"dtype":"F16","shape":[4],"data_offsets":[8,16]}}'
    bad = raw_file(tmp_path / "dup.safetensors", h, b"\0" * 16)
    check_bad(tmp_path, bad, InvalidFileError, "duplicate key 'w'")


def test_pickle_checkpoint(tmp_path):
    import pickle

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    msg = check_bad(tmp_path, bad, InvalidFileError, "pickle")
    assert "safetensors" in msg and "astolfomix convert" in msg  # says how to convert
    zipped = tmp_path / "model.pt"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    check_bad(tmp_path, zipped, InvalidFileError, "pickle")


def test_header_length_that_looks_like_pickle_magic_is_fine(tmp_path):
    # 0x0280 = 640: the little-endian length starts with 0x80 0x02, a pickle's protocol-2 magic.
    name = "k" * (640 - len('{"":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}'))
    h = json.dumps({name: entry(shape=(1,), offs=(0, 2))}, separators=(",", ":")).encode()
    assert len(h) == 640
    p = raw_file(tmp_path / "fine.safetensors", h, b"\0\0")
    assert p.read_bytes()[:2] == b"\x80\x02"
    assert am.Checkpoint(p).keys() == [name]


def test_directory_input(tmp_path):
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    check_bad(tmp_path, d, InvalidFileError, "directory")


def test_missing_file(tmp_path):
    msg = check_bad(tmp_path, tmp_path / "nope.safetensors", InputNotFoundError)
    assert "no such file" in msg
    assert issubclass(InputNotFoundError, FileNotFoundError)


def test_empty_input_list(tmp_path):
    with pytest.raises(PlanError, match="at least one"):
        am.mean([], tmp_path / "o.safetensors", progress=False)
    assert leftovers(tmp_path) == []


def test_output_in_missing_folder(tmp_path):
    g = good(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        am.mean([g], tmp_path / "no" / "o.safetensors", progress=False)
    assert leftovers(tmp_path) == ["good.safetensors"]


def test_output_exists_and_overwrite(tmp_path):
    g = good(tmp_path)
    o = tmp_path / "o.safetensors"
    o.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        am.mean([g], o, progress=False)
    assert o.read_bytes() == b"precious"
    am.mean([g], o, progress=False, overwrite=True)
    assert am.Checkpoint(o).tensor("w").tolist() == [1, 1, 1, 1]


def test_output_is_an_input_even_by_another_name(tmp_path):
    g = good(tmp_path)
    link = tmp_path / "hardlink.safetensors"
    os.link(g, link)
    before = g.read_bytes()
    for target in (g, link):
        with pytest.raises(OutputError, match="one of the inputs"):
            am.mean([g], target, progress=False, overwrite=True)
    assert g.read_bytes() == before


def test_shape_mismatch_names_key_and_both_files(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save(a, {"w": np.ones(4, np.float16)})
    save(b, {"w": np.ones((2, 2), np.float16)})
    with pytest.raises(MismatchError) as ei:
        am.mean([a, b], tmp_path / "o.safetensors", progress=False)
    assert "'w'" in str(ei.value) and "a.safetensors" in str(ei.value) and "b.safetensors" in str(ei.value)
    assert leftovers(tmp_path) == ["a.safetensors", "b.safetensors"]


def test_float_vs_int_mismatch(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save(a, {"w": np.ones(4, np.float16)})
    save(b, {"w": np.ones(4, np.int64)})
    with pytest.raises(MismatchError, match="'w'.*F16.*a.safetensors.*I64.*b.safetensors"):
        am.mean([a, b], tmp_path / "o.safetensors", progress=False)


def test_bad_weights_and_dtype(tmp_path):
    g = good(tmp_path)
    with pytest.raises(PlanError, match="weights"):
        am.mean([g], tmp_path / "o.safetensors", weights=[1, 2], progress=False)
    with pytest.raises(PlanError, match="finite"):
        am.mean([g], tmp_path / "o.safetensors", weights=[float("nan")], progress=False)
    with pytest.raises(PlanError, match="unknown output dtype"):
        am.mean([g], tmp_path / "o.safetensors", dtype="int4", progress=False)
    assert leftovers(tmp_path) == ["good.safetensors"]


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    import astolfomix_rs as am
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        am.mean(sys.argv[1:3], sys.argv[3], progress=False)
    except am.errors.OutputError as e:
        print("OutputError:", e)
    """
)


def test_file_larger_than_the_file_system_allows(tmp_path):
    # EFBIG (here from a file size limit) is not "disk full": the message says what it is, and
    # names the output the user asked for, not the hidden temp file.
    files = []
    for i in range(2):
        p = tmp_path / f"{i}.safetensors"
        save(p, {"w": np.ones(200_000, np.float16)})
        files.append(str(p))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, *files, str(out)], capture_output=True, text=True, timeout=60)
    assert "OutputError:" in r.stdout and "EFBIG" in r.stdout, r.stdout + r.stderr
    assert f"{out}: is larger" in r.stdout and ".tmp" not in r.stdout, r.stdout
    assert leftovers(tmp_path) == ["0.safetensors", "1.safetensors"]
    assert issubclass(DiskFullError, OSError)


SIGINT = textwrap.dedent(
    """
    import os, signal, sys, time
    import astolfomix_rs as am
    sent = []
    def tick(done, total):
        if not sent:  # a real SIGINT, as Ctrl-C sends it, once the engine is under way
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
    try:
        am.mean(sys.argv[1:-1], sys.argv[-1], progress=tick, threads=1, kernel="scalar", durable=False, chunk=64)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - sent[0], flush=True)
    """
)


def test_ctrl_c_stops_within_a_second_and_leaves_nothing(tmp_path):
    files = []
    for i in range(6):
        p = tmp_path / f"{i}.safetensors"
        save(p, {f"w{k}": np.full(4_000_000, i, np.float32) for k in range(12)}, durable=False)
        files.append(str(p))
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", SIGINT, *files, str(out)], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("interrupted"), r.stdout + r.stderr
    assert float(r.stdout.split()[1]) < 1.0
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)


@settings(max_examples=1000)
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_random_files_never_crash(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("fz") / "f.safetensors"
    p.write_bytes(blob)
    with pytest.raises(InvalidFileError):
        am.Checkpoint(p)


VALID = b'{"__metadata__":{"a":"b"},"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"i":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}'


@settings(max_examples=1000)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 24))
def test_fuzz_corrupted_headers(tmp_path_factory, edits, data_len):
    h = bytearray(VALID)
    for pos, b in edits:
        h[pos] = b
    p = tmp_path_factory.mktemp("fz") / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + bytes(h) + b"\0" * data_len)
    try:
        ck = am.Checkpoint(p)
    except InvalidFileError as e:
        assert "f.safetensors" in str(e)
    else:  # still valid: every tensor must be readable inside the file
        for k in ck.keys():
            ck.raw(k)
