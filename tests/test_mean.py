"""The mean engine against the numpy emulation of its recipe and a float64 reference."""

from __future__ import annotations

import threading

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.core.plan import normalize
from astolfomix_rs.core.save import save
from hypothesis import given
from hypothesis import strategies as st
from reference import decode, emulate_mean, encode, round_minifloat, ulp

FLOATS = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]
OUTS = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]


def random_raw(rng, dtype: str, shape, scale_exp: int) -> np.ndarray:
    """Finite random values of a magnitude, rounded into ``dtype``, as raw bytes."""
    n = int(np.prod(shape)) if shape else 1
    vals = rng.standard_normal(n) * 2.0 ** scale_exp
    if dtype in ("F8_E4M3",):
        vals = np.clip(vals, -400, 400)
    if dtype in ("F16", "F8_E5M2"):
        vals = np.clip(vals, -6e4, 6e4)
    return encode(vals, dtype)


def write_input(path, name, raw, dtype, shape, pad: int) -> None:
    t = {"pad": np.zeros(pad, np.uint8)} if pad else {}
    t[name] = (dtype, tuple(shape), raw)
    save(path, t, overwrite=True, durable=False)


def read_raw(path, name) -> np.ndarray:
    return np.array(am.Checkpoint(path).raw(name))


@st.composite
def cases(draw):
    n = draw(st.integers(1, 64) if draw(st.booleans()) else st.integers(1, 6))
    shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 5), (33,), (2, 3, 17), (1031,)]))
    dtypes = [draw(st.sampled_from(FLOATS)) for _ in range(n)]
    out = draw(st.sampled_from(OUTS))
    scale = draw(st.integers(-20, 12))
    weighted = draw(st.booleans())
    weights = [draw(st.floats(0.01, 10)) for _ in range(n)] if weighted else None
    accumulate = draw(st.sampled_from(["f32", "f32", "f64"]))
    pads = [draw(st.integers(0, 7)) for _ in range(n)]
    seed = draw(st.integers(0, 2**32 - 1))
    return n, shape, dtypes, out, scale, weights, accumulate, pads, seed


@given(cases())
def test_mean_bit_identical_to_numpy_recipe(tmp_path_factory, case):
    n, shape, dtypes, out, scale, weights, accumulate, pads, seed = case
    tmp = tmp_path_factory.mktemp("m")
    rng = np.random.default_rng(seed)
    raws, paths = [], []
    for i in range(n):
        raw = random_raw(rng, dtypes[i], shape, scale)
        p = tmp / f"in{i}.safetensors"
        write_input(p, "w", raw, dtypes[i], shape, pads[i])
        raws.append((raw, dtypes[i]))
        paths.append(p)
    outs = []
    for threads in (1, 2, 7):
        o = tmp / f"out{threads}.safetensors"
        am.mean(paths, o, weights=weights, dtype=out, accumulate=accumulate, threads=threads,
                progress=False, durable=False, keys=["w"], chunk=97)
        outs.append(read_raw(o, "w"))
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()
    got = decode(outs[0], out)
    w32 = normalize(weights) if weights is not None else None
    expect = decode(emulate_mean(raws, out, w32, accumulate), out)
    np.testing.assert_array_equal(got, expect)  # NaN positions must match too
    # Within the accumulation bound of the float64 reference.
    xs = [decode(r, d) for r, d in raws]
    w = np.array(w32 if w32 is not None else [1.0 / n] * n)
    ref = sum(wi * x for wi, x in zip(w, xs))
    absum = sum(abs(wi * x) for wi, x in zip(w, xs))
    finite = np.isfinite(got) & np.isfinite(ref)
    bound = ulp(ref, out) + n * 2.0**-23 * absum
    assert np.all(np.abs(got - ref)[finite] <= bound[finite])


def test_uniform_mean_exact_small(tmp_path):
    a = np.array([1.0, 2.0, -0.0, 65504.0], np.float16)
    b = np.array([2.0, 2.0, -0.0, 65504.0], np.float16)
    for i, x in enumerate((a, b)):
        save(tmp_path / f"{i}.safetensors", {"t": x})
    am.mean([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "o.safetensors", progress=False)
    got = am.Checkpoint(tmp_path / "o.safetensors").tensor("t")
    # The sum starts at -0.0 (addition's identity): -0 + -0 stays -0; the sum 131008 overflows
    # f16 but not the f32 accumulator.
    np.testing.assert_array_equal(got.view(np.uint16), np.array([1.5, 2.0, -0.0, 65504.0], np.float16).view(np.uint16))


def test_nan_stays_nan(tmp_path):
    x = np.array([np.nan, 1.0, np.inf, -np.inf], np.float32)
    y = np.array([1.0, np.nan, 1.0, 1.0], np.float32)
    save(tmp_path / "a.safetensors", {"t": x})
    save(tmp_path / "b.safetensors", {"t": y})
    for out in ("f16", "bf16", "f32"):
        o = tmp_path / f"o{out}.safetensors"
        am.mean([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], o, dtype=out, progress=False)
        got = am.Checkpoint(o).tensor("t").astype(np.float64)
        assert np.isnan(got[0]) and np.isnan(got[1])
        assert got[2] == np.inf and got[3] == -np.inf


def test_round_minifloat_matches_numpy_and_ml_dtypes(rng):

    x = np.concatenate([rng.standard_normal(20000) * 2.0 ** rng.integers(-30, 20, 20000),
                        [0.0, -0.0, np.inf, -np.inf, 1e-30, 65520.0, 65519.99, 464.0, 470.0]])
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(round_minifloat(x, "F16"), x.astype(np.float16).view(np.uint16))
        x32 = x.astype(np.float32)
        _check_ml(x32)


def _check_ml(x32):
    import ml_dtypes
  # ml_dtypes rounds float32 inputs directly
    for d, t in (("BF16", ml_dtypes.bfloat16), ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2)):
        ours = round_minifloat(x32.astype(np.float64), d)
        theirs = x32.astype(t).view(np.uint16 if d == "BF16" else np.uint8)
        nan = np.isnan(x32.astype(t).astype(np.float32))
        np.testing.assert_array_equal(ours[~nan], theirs[~nan])
        assert np.all(np.isnan(decode(ours[nan].view(np.uint8), d)))


@pytest.mark.parametrize("kernel,io", [(k, "pread") for k in am.kernels()] + [(am.kernels()[-1], "mmap"), (am.kernels()[-1], "auto")])
def test_every_kernel_gives_same_file(tmp_path, rng, kernel, io):
    paths = []
    for i, d in enumerate(["F16", "BF16", "F32"]):
        p = tmp_path / f"{i}.safetensors"
        write_input(p, "w", random_raw(rng, d, (1000, 3), 0), d, (1000, 3), i)
        paths.append(p)
    (tmp_path / "ref").mkdir()
    (tmp_path / "o").mkdir()
    ref = tmp_path / "ref" / "m.safetensors"  # the same name: the title in the metadata is its stem
    am.mean(paths, ref, kernel="scalar", progress=False, durable=False)
    o = tmp_path / "o" / "m.safetensors"
    am.mean(paths, o, kernel=kernel, io=io, progress=False, durable=False)
    assert o.read_bytes() == ref.read_bytes()


def test_missing_key_averaged_over_inputs_that_have_it(tmp_path):
    save(tmp_path / "a.safetensors", {"x": np.ones(4, np.float16), "only_a": np.full(2, 3.0, np.float16)})
    save(tmp_path / "b.safetensors", {"x": np.zeros(4, np.float16)})
    save(tmp_path / "c.safetensors", {"x": np.zeros(4, np.float16), "only_a": np.full(2, 5.0, np.float16)})
    files = [tmp_path / f"{c}.safetensors" for c in "abc"]
    r = am.mean(files, tmp_path / "o.safetensors", progress=False)
    assert r.notes["missing"] == {"only_a": ["b.safetensors"]}
    ck = am.Checkpoint(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(ck.tensor("only_a"), np.full(2, 4.0, np.float16))
    np.testing.assert_array_equal(ck.tensor("x"), np.full(4, np.float16(np.float32(1) / np.float32(3))))
    with pytest.raises(am.errors.MismatchError, match="only_a.*b.safetensors"):
        am.mean(files, tmp_path / "o2.safetensors", strict=True, progress=False)
    assert not (tmp_path / "o2.safetensors").exists()


def test_int_tensors_come_from_first_input(tmp_path):
    save(tmp_path / "a.safetensors", {"ids": np.arange(77, dtype=np.int64)[None], "w": np.ones(2, np.float32)})
    save(tmp_path / "b.safetensors", {"ids": np.zeros((1, 77), np.int64), "w": np.ones(2, np.float32)})
    am.mean([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors", progress=False)
    ck = am.Checkpoint(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(ck.tensor("ids"), np.arange(77)[None])
    assert ck.info["ids"].dtype == "I64" and ck.info["w"].dtype == "F16"


def test_output_loads_in_reference_safetensors_and_has_provenance(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_file({"w": np.ones((3, 3), np.float32), "b": np.arange(3, dtype=np.float16)}, tmp_path / "a.safetensors")
    save_file({"w": np.zeros((3, 3), np.float32), "b": np.arange(3, dtype=np.float16)}, tmp_path / "b.safetensors")
    r = am.mean([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors",
                weights=[3, 1], metadata={"author": "me"}, progress=False)
    loaded = load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(loaded["w"], np.full((3, 3), 0.75, np.float16))
    md = am.Checkpoint(tmp_path / "o.safetensors").metadata
    assert md["author"] == "me" and md["astolfomix.weights"] == "[3.0, 1.0]"
    assert '"name":"a.safetensors"' in md["astolfomix.inputs"] and md["astolfomix.version"] == am.__version__
    assert r.bytes_read == 2 * (36 + 6) and r.bytes_written == (tmp_path / "o.safetensors").stat().st_size


def test_unnormalised_weights(tmp_path):
    save(tmp_path / "a.safetensors", {"w": np.ones(3, np.float32)})
    save(tmp_path / "b.safetensors", {"w": np.ones(3, np.float32)})
    am.mean([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors",
            weights=[1.0, 1.0], normalize_weights=False, dtype="f32", progress=False)
    np.testing.assert_array_equal(am.Checkpoint(tmp_path / "o.safetensors").tensor("w"), [2.0, 2.0, 2.0])


def test_tensors_are_read_into_their_own_arrays(tmp_path):
    save(tmp_path / "a.safetensors", {"w": np.arange(12, dtype=np.float16).reshape(3, 4)})
    ck = am.Checkpoint(tmp_path / "a.safetensors")
    t = ck.tensor("w")
    assert t.shape == (3, 4) and t.dtype == np.float16
    del ck  # the array does not depend on the open file
    assert float(t[2, 3]) == 11.0


def test_gil_released_during_merge(tmp_path):
    for i in range(2):
        save(tmp_path / f"{i}.safetensors", {"w": np.ones(8_000_000, np.float16)})
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(1)

    t = threading.Thread(target=count)
    t.start()
    before = len(ticks)
    am.mean([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "o.safetensors",
            progress=False, durable=False, threads=1, kernel="scalar")
    during = len(ticks) - before
    done.set()
    t.join()
    assert during > 1000  # the counting thread ran while the engine worked


def test_progress_callback_and_cancel(tmp_path):
    for i in range(2):
        save(tmp_path / f"{i}.safetensors", {f"w{k}": np.ones(1_000_000, np.float16) for k in range(40)})
    files = [tmp_path / "0.safetensors", tmp_path / "1.safetensors"]
    seen = []

    def stop(done, total):
        seen.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        am.mean(files, tmp_path / "o.safetensors", progress=stop, threads=1, kernel="scalar", chunk=4096)
    assert seen and seen[0][1] == 2 * 40 * 2_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]


def test_save_keeps_scalars_and_empty_shapes(tmp_path):
    save(tmp_path / "s.safetensors", {"s": np.float32(2.5) * np.ones((), np.float32), "e": np.zeros((0, 3), np.float16),
                                      "t": np.arange(6, dtype=np.float32).reshape(2, 3).T})
    ck = am.Checkpoint(tmp_path / "s.safetensors")
    assert ck.info["s"].shape == () and float(ck.tensor("s")) == 2.5
    assert ck.info["e"].shape == (0, 3) and ck.info["t"].shape == (3, 2)
    np.testing.assert_array_equal(ck.tensor("t"), np.arange(6, dtype=np.float32).reshape(2, 3).T)


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
@pytest.mark.parametrize("accumulate", ["f32", "f64"])
def test_the_sign_of_zero_is_kept(tmp_path, device, accumulate):
    """A mean of one file (a conversion) and a mean of files that all hold -0.0 keep -0.0; a
    mixed -0.0/+0.0 sum is +0.0 (IEEE), on every executor."""
    if device != "cpu":
        pytest.importorskip("torch")
    a = np.array([-0.0, 0.0, -0.0, 1.5, -2.0], np.float16)
    b = np.array([-0.0, -0.0, 0.0, 1.5, -2.0], np.float16)
    save(tmp_path / "a.safetensors", {"w": a})
    save(tmp_path / "b.safetensors", {"w": b})
    cases = [([tmp_path / "a.safetensors"], None, a.astype(np.float32)),
             ([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], None, np.array([-0.0, 0.0, 0.0, 1.5, -2.0])),
             ([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], [0.25, 0.75],
              np.array([-0.0, 0.0, 0.0, 1.5, -2.0]))]
    for k, (files, w, want) in enumerate(cases):
        out = tmp_path / f"o{k}.safetensors"
        am.mean(files, out, weights=w, dtype="f32", accumulate=accumulate, device=device, progress=False)
        got = am.Checkpoint(out).tensor("w")
        np.testing.assert_array_equal(got, want.astype(np.float32))
        assert list(np.signbit(got)) == list(np.signbit(want)), (k, got)
