"""The torch executor runs the same plans as the Rust engine and must give the same bytes.
On the CPU this runs everywhere (CI has no GPU); the gpu-marked tests run wherever CUDA exists."""

from __future__ import annotations

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.core.save import save
from astolfomix_rs.errors import DeviceError
from hypothesis import given
from hypothesis import strategies as st
from reference import decode, encode, ulp

torch = pytest.importorskip("torch")  # installed by .ci/run: the [torch] extra
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


def make_inputs(tmp, rng, dtypes, shape=(1003,), extra=True):
    paths = []
    for i, d in enumerate(dtypes):
        vals = rng.standard_normal(int(np.prod(shape))) * 3
        t = {"pad": np.zeros(i % 3, np.uint8)} if i % 3 else {}
        t["w"] = (d, shape, encode(vals, d))
        t["v"] = (d, (7,), encode(vals[:7] * 100, d))
        if extra:
            t["ids"] = np.arange(77, dtype=np.int64)[None]
        p = tmp / f"in{i}.safetensors"
        save(p, t, overwrite=True, durable=False)
        paths.append(p)
    return paths


@given(st.lists(st.sampled_from(["F16", "BF16", "F32"]), min_size=1, max_size=8),
       st.sampled_from(["f16", "bf16", "f32"]), st.integers(0, 2**32 - 1), st.integers(50, 5000))
def test_torch_cpu_uniform_is_byte_identical(tmp_path_factory, dtypes, out, seed, chunk):
    tmp = tmp_path_factory.mktemp("t")
    paths = make_inputs(tmp, np.random.default_rng(seed), dtypes)
    (tmp / "rust").mkdir()
    (tmp / "torch").mkdir()  # one file name in two folders: the metadata's title is the name
    am.mean(paths, tmp / "rust" / "m.safetensors", dtype=out, progress=False, durable=False)
    am.mean(paths, tmp / "torch" / "m.safetensors", dtype=out, progress=False, durable=False, device="torch-cpu",
            chunk=chunk)
    assert (tmp / "rust" / "m.safetensors").read_bytes() == (tmp / "torch" / "m.safetensors").read_bytes()


@given(st.lists(st.sampled_from(["F16", "BF16", "F32"]), min_size=2, max_size=6),
       st.sampled_from(["F16", "BF16", "F32"]), st.integers(0, 2**32 - 1))
def test_torch_cpu_weighted_within_one_ulp(tmp_path_factory, dtypes, out, seed):
    tmp = tmp_path_factory.mktemp("t")
    rng = np.random.default_rng(seed)
    paths = make_inputs(tmp, rng, dtypes)
    w = list(rng.uniform(0.1, 5, len(dtypes)))
    am.mean(paths, tmp / "rust.safetensors", weights=w, dtype=out, progress=False, durable=False)
    am.mean(paths, tmp / "torch.safetensors", weights=w, dtype=out, progress=False, durable=False, device="torch-cpu")
    a = decode(am.Checkpoint(tmp / "rust.safetensors").raw("w"), out)
    b = decode(am.Checkpoint(tmp / "torch.safetensors").raw("w"), out)
    assert np.all(np.abs(a - b) <= ulp(a, out))


def test_torch_cpu_conversion_and_copy(tmp_path, rng):
    paths = make_inputs(tmp_path, rng, ["F32", "BF16"])
    from astolfomix_rs.core.plan import Output, Plan

    plan = Plan(inputs=paths, outputs=[
        Output("w16", "copy", [(0, "w")], "F16"),   # conversion
        Output("ids", "copy", [(0, "ids")], None),  # raw copy
        Output("wb", "copy", [(1, "w")], "F32"),
    ])
    am.execute(plan, tmp_path / "r.safetensors", progress=False)
    am.execute(plan, tmp_path / "t.safetensors", progress=False, device="torch-cpu")
    assert (tmp_path / "r.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


def test_torch_path_leaves_nothing_on_error(tmp_path, rng):
    paths = make_inputs(tmp_path, rng, ["F16", "F16"])
    calls = []

    def stop(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        am.mean(paths, tmp_path / "o.safetensors", progress=stop, device="torch-cpu", chunk=100)
    assert calls and not (tmp_path / "o.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0.safetensors", "in1.safetensors"]


@pytest.mark.skipif(CUDA, reason="checks the message shown where no GPU exists")
def test_cuda_without_gpu_says_so(tmp_path, rng):
    paths = make_inputs(tmp_path, rng, ["F16"])
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        am.mean(paths, tmp_path / "o.safetensors", device="cuda", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


@gpu
@pytest.mark.gpu
def test_cuda_uniform_byte_identical_and_memory_bounded(tmp_path, rng):
    paths = make_inputs(tmp_path, rng, ["F16", "BF16", "F32", "F16", "F16", "BF16"], shape=(3_000_001,))
    (tmp_path / "r").mkdir()
    (tmp_path / "c").mkdir()  # one file name in two folders: the metadata's title is the name
    am.mean(paths, tmp_path / "r" / "m.safetensors", progress=False)
    bound = 64 << 20
    r = am.mean(paths, tmp_path / "c" / "m.safetensors", progress=False, device="cuda", gpu_memory=bound)
    assert (tmp_path / "r" / "m.safetensors").read_bytes() == (tmp_path / "c" / "m.safetensors").read_bytes()
    assert r.notes["peak_gpu_bytes"] <= bound


@gpu
@pytest.mark.gpu
def test_cuda_weighted_within_one_ulp(tmp_path, rng):
    paths = make_inputs(tmp_path, rng, ["F16", "BF16", "F32"], shape=(100_003,))
    w = [0.2, 0.3, 0.5]
    for out in ("f16", "bf16", "f32"):
        am.mean(paths, tmp_path / "r.safetensors", weights=w, dtype=out, progress=False, overwrite=True)
        am.mean(paths, tmp_path / "c.safetensors", weights=w, dtype=out, progress=False, overwrite=True, device="cuda")
        a = decode(am.Checkpoint(tmp_path / "r.safetensors").raw("w"), out.upper())
        b = decode(am.Checkpoint(tmp_path / "c.safetensors").raw("w"), out.upper())
        assert np.all(np.abs(a - b) <= ulp(a, out.upper()))
