"""pytest-benchmark runs of the engine (``pytest benches --benchmark-enable``). In the normal test
run (benchmarks disabled) each runs once and checks its result. The full comparison against the
read/write floor, naive torch and sd-mecha is ``astolfomix bench``."""

from __future__ import annotations

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs.tools.synth import make_checkpoint


@pytest.fixture(scope="module")
def sd1_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return [make_checkpoint(d / f"_x{i:02d}-b.safetensors", "sd1", factor=8, seed=i, fast=True) for i in range(1, 5)]


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_engine_mean(benchmark, sd1_inputs, tmp_path, threads):
    out = tmp_path / "o.safetensors"

    def run():
        return am.mean(sd1_inputs, out, threads=threads, durable=False, overwrite=True, progress=False)

    r = benchmark(run)
    k = "model.diffusion_model.out.2.weight"
    acc = sum(am.Checkpoint(p).tensor(k).astype(np.float32) for p in sd1_inputs)
    expect = (acc / np.float32(4)).astype(np.float16)
    np.testing.assert_array_equal(am.Checkpoint(out).tensor(k).view(np.uint16), expect.view(np.uint16))
    cks = [am.Checkpoint(p) for p in sd1_inputs]
    floats = sum(t.nbytes for c in cks for t in c.info.values() if t.is_float)
    ints = sum(t.nbytes for t in cks[0].info.values() if not t.is_float)  # copied from the first input
    assert r.bytes_read == floats + ints


def test_bench_torch_executor_cpu(benchmark, sd1_inputs, tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "o").mkdir()
    (tmp_path / "r").mkdir()
    out = tmp_path / "o" / "m.safetensors"  # one name: the metadata's title is the file name
    ref = tmp_path / "r" / "m.safetensors"
    am.mean(sd1_inputs, ref, durable=False, progress=False)
    benchmark(lambda: am.mean(sd1_inputs, out, durable=False, overwrite=True, progress=False, device="torch-cpu"))
    assert out.read_bytes() == ref.read_bytes()


def test_bench_cli_small(tmp_path, capsys):
    """`astolfomix bench` end to end on tiny inputs: every contender reports a time and a ratio."""
    import json

    from astolfomix_rs.cli import main

    assert main(["bench", "-n", "2", "--factor", "16", "--folder", str(tmp_path), "--repeat", "1", "--json",
                 "--no-naive", "--threads", "1,2"]) == 0
    out = capsys.readouterr()
    rep = json.loads(out.out)
    assert f"left in {tmp_path}: 2 files" in out.err  # it says what stays on disk, and where
    names = [r["name"] for r in rep["results"]]
    assert names[:2] == ["astolfomix cpu, 1 threads", "astolfomix cpu, 2 threads"]
    assert all(r["seconds"] > 0 and r["ratio_to_floor"] > 0 and r["peak_anon_mb"] > 0 for r in rep["results"])
    assert rep["floor"]["total_s"] > 0 and rep["input_bytes"] > 0


def test_bench_on_your_files_is_labelled_by_their_architecture(tmp_path, capsys):
    from astolfomix_rs.cli import main
    from astolfomix_rs.tools.synth import make_checkpoint

    files = [str(make_checkpoint(tmp_path / f"{i}.safetensors", "sdxl", factor=32, seed=i)) for i in range(2)]
    assert main(["bench", "--files", *files, "--folder", str(tmp_path / "b"), "--repeat", "1", "--no-naive",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "N=2 sdxl inputs (your files)" in text and "factor" not in text.split("\n")[1]


def test_bench_plot_png(tmp_path):
    """GB/s against N as a PNG (matplotlib is in the test extra, so this runs in CI)."""
    pytest.importorskip("matplotlib")
    from astolfomix_rs.tools.bench import BenchReport, Result, plot

    reps = []
    for n in (2, 4):
        r = BenchReport(n=n, arch="sd1", factor=1, input_bytes=n * 10**9, output_bytes=10**9, cpus=2,
                        floor={"read_s": 0.1 * n, "write_s": 0.2, "total_s": 0.1 * n + 0.2})
        r.results.append(Result("astolfomix cpu, 2 threads", 0.08 * n, n * 10**9))
        reps.append(r)
    out = tmp_path / "plot.png"
    assert plot(reps, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
