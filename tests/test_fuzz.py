"""Fuzzing the places where outside text and files enter (issue 9): the grid and TOML recipe
parsers, and every command's metadata and shape paths over mutated headers. Each case must end
as a result or an ``error:`` line (exit 2) within a time bound: never a traceback, never a hang."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
from astolfomix_rs.cli import main
from astolfomix_rs.commands import mecha as mc
from astolfomix_rs.commands import recipe as rc
from astolfomix_rs.errors import AstolfomixError
from astolfomix_rs.tools.synth import make_state
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# Characters that matter to the notations, plus anything else.
GRID_ALPHABET = st.sampled_from(list("unetTE01289ax-=,: \t\n_`") + ["te0", "te1", "unet:", "=sd", "main=", "\x1b", "é"])
grid_text = st.lists(st.one_of(GRID_ALPHABET, st.text(max_size=4)), max_size=80).map("".join)


@given(grid_text)
@settings(max_examples=300, deadline=2000)
def test_grid_parser_returns_or_raises_a_recipe_error(text):
    try:
        r = rc.parse_grid(text)
    except AstolfomixError:
        return
    assert isinstance(r.format(), str)


def test_grid_parser_is_linear_on_long_lines():
    for line in ("unet: " + " " * 200_000 + "01", "a" + " " * 200_000 + "=x", "=" * 200_000,
                 "unet:" + ",".join(["01"] * 20_000), "unet: 01" + "=" * 100_000 + "3"):
        t0 = time.perf_counter()
        try:
            rc.parse_grid(line + "\n")
        except AstolfomixError:
            pass
        assert time.perf_counter() - t0 < 2.0, line[:20]


toml_value = st.recursive(
    st.one_of(st.none().map(lambda _: ""), st.booleans(), st.integers(), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["01", "02", "x.safetensors", "f16"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["models", "weights", "unet", "te0", "main", "01", "base", "method", "params", "alpha"]), inner, max_size=4)),
    max_leaves=12,
)
toml_doc = st.dictionaries(st.sampled_from(["base", "dtype", "accumulate", "outputs", "models", "components", "robust", "x"]),
                           toml_value, max_size=5)


def _toml(d) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if v != v else ("inf" if v == float("inf") else ("-inf" if v == float("-inf") else repr(v)))
        if isinstance(v, (int, str)):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"

    return "\n".join(f"{k} = {val(v)}" for k, v in d.items()) + "\n"


@given(toml_doc)
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_toml_parsers_return_or_raise_a_recipe_error(d):
    text = _toml(d)
    for parse in (rc.parse_toml, mc.parse_robust_toml):
        try:
            parse(text)
        except AstolfomixError:
            pass


@given(st.text(max_size=200))
@example("\\")  # found by this test: a lone backslash made an empty line of tokens
@settings(max_examples=200, deadline=2000)
def test_mecha_parser_returns_or_raises_a_recipe_error(text):
    try:
        mc.parse_mecha(text)
    except AstolfomixError:
        pass


# --- Headers and shapes: every command over mutated files ----------------------------------------

@pytest.fixture(scope="module")
def sample():
    out = {}
    for k, v in make_state("sdxl", factor=32).items():
        dt = {"float16": "F16", "float32": "F32", "int64": "I64"}[str(v.dtype)]
        out[k] = (dt, list(v.shape), np.ascontiguousarray(v).tobytes())
    return out


def _write(path, tensors, meta=None):
    """A valid container (offsets follow the data) of possibly absurd tensors."""
    h, blobs, off = {}, [], 0
    if meta is not None:
        h["__metadata__"] = meta
    for k, (dt, shape, b) in tensors.items():
        h[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    j = json.dumps(h).encode()
    path.write_bytes(struct.pack("<Q", len(j)) + j + b"".join(blobs))


MUTATIONS = ["rank1", "scalar", "empty", "huge_dim", "int", "bf16", "dtype", "name", "meta", "drop", "dup_shape"]
SPECIAL = ["input_blocks.0.0.weight", "attn2.to_k.weight", "label_emb.0.0.weight", "position_ids",
           "token_embedding.weight", "conv_in.weight", "ln_final.weight", "text_projection", "out.2.weight"]


@given(st.lists(st.tuples(st.sampled_from(MUTATIONS), st.one_of(st.sampled_from(SPECIAL), st.integers(0, 5000))),
                min_size=1, max_size=3))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_command_over_mutated_headers_prints_a_result_or_an_error_line(tmp_path, sample, capsys, muts):
    tensors = dict(sample)
    meta = {"modelspec.title": "t"}
    keys = list(tensors)
    for kind, which in muts:
        key = next((k for k in keys if k.endswith(which)), keys[0]) if isinstance(which, str) else keys[which % len(keys)]
        if key not in tensors:
            continue
        dt, shape, raw = tensors[key]
        if kind == "rank1":
            tensors[key] = (dt, [int(np.prod(shape))], raw)
        elif kind == "scalar":
            tensors[key] = ("F16", [], b"\x00\x3c")
        elif kind == "empty":
            tensors[key] = (dt, [0, 4], b"")
        elif kind == "huge_dim":
            tensors[key] = (dt, [0, 2**64 - 1], b"")
        elif kind == "int":
            tensors[key] = ("I8", [len(raw)], raw)
        elif kind == "bf16":
            tensors[key] = ("BF16", shape, raw) if dt == "F16" else (dt, shape, raw)
        elif kind == "dtype":
            tensors[key] = ("Q4\x1b[2J", shape, raw)
        elif kind == "name":
            tensors[key + "\x07"] = tensors.pop(key)
        elif kind == "meta":
            meta[key] = "\x1b]0;x\x07" * 3
        elif kind == "drop":
            tensors.pop(key)
        elif kind == "dup_shape":
            tensors[key] = (dt, [1, *shape[::-1]], raw)
    a, b = tmp_path / "_x01-a.safetensors", tmp_path / "_x02-b.safetensors"
    _write(a, tensors, meta)
    _write(b, sample)
    (tmp_path / "r.txt").write_text("unet: 01,02\nte0: 01\nmain=o.safetensors\n")
    commands = [
        ["inspect", "--nan", str(a)], ["hash", str(a)], ["compare", "--distance", str(a), str(b)],
        ["mean", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--overwrite"],
        ["merge", str(tmp_path / "r.txt"), "--models", str(tmp_path), "--overwrite"],
        ["export", str(a), "te0", str(tmp_path / "e.safetensors"), "--overwrite"],
        ["import", str(b), str(a), "te0", str(tmp_path / "i.safetensors"), "--overwrite"],
        ["convert", str(a), str(tmp_path / "c.safetensors"), "--dtype", "bf16", "--prune", "--fix-position-ids",
         "--overwrite"],
        ["pool", "list", "--hash", str(tmp_path)],
    ]
    for cmd in commands:
        t0 = time.perf_counter()
        code = main(cmd)
        out = capsys.readouterr()
        assert code in (0, 2), (cmd, code)
        if code == 2:
            assert out.err.startswith(f"astolfomix {cmd[0]}: error: "), out.err
        assert "\x1b" not in out.out + out.err and "\x07" not in out.out + out.err
        assert time.perf_counter() - t0 < 30, cmd
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
