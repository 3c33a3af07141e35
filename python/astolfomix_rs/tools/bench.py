"""``astolfomix bench``: in one run, time the floor (what the job cannot avoid: reading the inputs
and writing an output-sized file) and every contender on the same synthetic inputs, and report
ratios. Each contender runs in its own process so its peak anonymous memory (RssAnon, not mapped
file pages) can be sampled from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .synth import make_checkpoint


@dataclass
class Result:
    name: str
    seconds: float
    input_bytes: int
    peak_anon_mb: float | None = None
    peak_gpu_mb: float | None = None
    note: str = ""
    ratio_to_floor: float | None = None

    @property
    def gbps(self) -> float:
        return self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = round(self.gbps, 3)
        return d


@dataclass
class BenchReport:
    n: int
    arch: str
    factor: int | None  # None: the user's own files
    input_bytes: int
    output_bytes: int
    cpus: int
    floor: dict[str, float] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    bandwidth: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "results"}
        d["results"] = [r.as_dict() for r in self.results]
        return d

    def table(self) -> str:
        lines = [
            f"N={self.n} {self.arch} inputs ({'your files' if self.factor is None else f'synthetic, factor {self.factor}'}), "
            f"{self.input_bytes / 1e9:.2f} GB in, "
            f"{self.output_bytes / 1e9:.2f} GB out, {self.cpus} CPUs",
            f"floor: read {self.floor.get('read_s', 0):.3f} s + write {self.floor.get('write_s', 0):.3f} s"
            f" = {self.floor.get('total_s', 0):.3f} s ({self.input_bytes / max(self.floor.get('total_s', 1e-9), 1e-9) / 1e9:.2f} GB/s)",
        ]
        for k, v in self.bandwidth.items():
            lines.append(f"{k}: {v:.1f} GB/s")
        lines.append(f"{'contender':34} {'seconds':>8} {'GB/s':>7} {'floor/t':>8} {'RssAnon MB':>11} {'GPU MB':>8}")
        for r in self.results:
            gpu = f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-"
            anon = f"{r.peak_anon_mb:.0f}" if r.peak_anon_mb is not None else "-"
            ratio = f"{r.ratio_to_floor:.2f}" if r.ratio_to_floor is not None else "-"
            lines.append(f"{r.name:34} {r.seconds:8.3f} {r.gbps:7.2f} {ratio:>8} {anon:>11} {gpu:>8}  {r.note}")
        return "\n".join(lines)


def _rss_anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_sampled(cmd: list[str], timeout: float = 3600) -> tuple[str, str, int, int]:
    """Runs ``cmd``, sampling its RssAnon every 5 ms: (stdout, stderr, returncode, peak RssAnon kB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            kb = _rss_anon_kb(proc.pid)
            if kb is not None:
                peak[0] = max(peak[0], kb)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
    return out, err, proc.returncode, peak[0]


def _run_worker(kind: str, args: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Runs one contender in a child process and returns its JSON line plus its peak RssAnon."""
    out, err, rc, peak = run_sampled([sys.executable, "-m", "astolfomix_rs.tools.bench", kind, json.dumps(args)], timeout)
    if rc != 0:
        raise RuntimeError(f"bench worker '{kind}' failed:\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_anon_mb"] = peak / 1024
    return res


def _sync() -> None:
    os.sync()


def measure_floor(files: list[Path], out_dir: Path, out_bytes: int, repeat: int) -> dict[str, float]:
    """Best of ``repeat``: `cat` of the inputs to /dev/null (warm) plus `dd` of an output-sized file."""
    read = write = float("inf")
    tmp = out_dir / ".floor.tmp"
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        read = min(read, time.perf_counter() - t)
        _sync()
        mb = max(1, out_bytes >> 20)
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={tmp}", "bs=1M", f"count={mb}"], capture_output=True, check=True)
        write = min(write, time.perf_counter() - t)
        tmp.unlink()
    return {"read_s": read, "write_s": write, "total_s": read + write}


def make_inputs(folder: Path, n: int, arch: str, factor: int) -> list[Path]:
    """Synthetic fp16 checkpoints, reused when already there with the same parameters."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        p = folder / f"_x{i + 1:02d}-bench-{arch}-f{factor}.safetensors"
        if not p.exists():
            make_checkpoint(p, arch, factor=factor, seed=i, fast=True)
        files.append(p)
    return files


def run(
    n: int = 4,
    arch: str = "sd1",
    factor: int = 1,
    folder: str | os.PathLike[str] | None = None,
    files: list[str] | None = None,
    threads: list[int] | None = None,
    repeat: int = 2,
    naive_torch: bool = True,
    cuda: bool | None = None,
    durable: bool = True,
    log=print,
) -> BenchReport:
    from .. import Checkpoint

    folder = Path(folder or Path.cwd() / "bench-out")
    inputs = [Path(f) for f in files] if files else make_inputs(folder, n, arch, factor)
    folder.mkdir(parents=True, exist_ok=True)
    in_bytes = sum(p.stat().st_size for p in inputs)
    ck = Checkpoint(inputs[0])
    out_bytes = sum(t.numel * (2 if t.is_float else t.nbytes // max(t.numel, 1)) for t in ck.info.values())
    cpus = os.cpu_count() or 1
    if files:
        from ..models.anatomy import detect

        arch = detect(ck).arch  # what the files are, not the synthetic default
    report = BenchReport(len(inputs), arch, None if files else factor, in_bytes, out_bytes, cpus)
    log(f"warming {len(inputs)} inputs ({in_bytes / 1e9:.2f} GB) ...")
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    report.floor = measure_floor(inputs, folder, out_bytes, repeat)
    out = folder / "bench-output.safetensors"
    base = {"files": [str(p) for p in inputs], "out": str(out)}

    def contender(name: str, kind: str, **extra: Any) -> None:
        best = None
        for _ in range(repeat):
            if out.exists():
                out.unlink()
            _sync()
            try:
                r = _run_worker(kind, {**base, **extra})
            except RuntimeError as e:
                log(f"{name}: skipped ({str(e).strip().splitlines()[-1]})")
                return
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        res = Result(name, best["seconds"], best.get("input_bytes", in_bytes), best["peak_anon_mb"],
                     best.get("peak_gpu_mb"), best.get("note", ""))
        res.ratio_to_floor = report.floor["total_s"] / res.seconds
        report.results.append(res)
        log(f"{name}: {res.seconds:.3f} s, {res.gbps:.2f} GB/s, floor/t {res.ratio_to_floor:.2f}")

    for t in threads or sorted({1, cpus}):
        contender(f"astolfomix cpu, {t} threads", "engine", threads=t, durable=False)
    if durable:
        contender(f"astolfomix cpu, {cpus} threads, fsync", "engine", threads=cpus, durable=True)
    has_torch = _importable("torch")
    if cuda is None:
        cuda = has_torch and _cuda_available()
    if cuda:
        report.bandwidth.update(_run_worker("h2d", {}).get("bandwidth", {}))
        contender("astolfomix cuda", "cuda", durable=False)
        contender("naive torch on cuda", "naive-torch-cuda")
    if has_torch:
        contender("astolfomix torch executor (cpu)", "torch-cpu", durable=False)
    if naive_torch and has_torch:
        contender("naive torch (load, acc += t.float())", "naive-torch")
    if _importable("sd_mecha"):
        contender("sd-mecha n_average", "sd-mecha")
    if out.exists():
        out.unlink()
    left = [p for p in folder.iterdir() if p.is_file()]
    if left:
        size = sum(p.stat().st_size for p in left)
        log(f"left in {folder}: {len(left)} files, {size / 1e9:.2f} GB"
            + ("" if files else " of synthetic inputs (reused by the next bench; remove the folder to free the space)"))
    return report


def plot(reports: list[BenchReport], path: str | os.PathLike[str]) -> bool:
    """A PNG of input GB/s against N, one line per contender plus the floor; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [r.n for r in reports]
    ax.plot(ns, [r.input_bytes / r.floor["total_s"] / 1e9 for r in reports], "k--", label="floor (read + write)")
    names = list(dict.fromkeys(res.name for r in reports for res in r.results))
    for name in names:
        pts = [(r.n, res.gbps) for r in reports for res in r.results if res.name == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xticks(ns)
    ax.set_xlabel("N (input checkpoints)")
    ax.set_ylabel("input GB/s")
    ax.set_title(f"{reports[0].arch} fp16 mean, {reports[0].cpus} CPUs")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _cuda_available() -> bool:
    try:
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip() == "True"
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------------------------
# Workers (run in a child process): each prints one JSON line with its own timing.


def _worker(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    files, out = a.get("files", []), a.get("out")
    in_bytes = sum(os.path.getsize(f) for f in files)
    if kind in ("engine", "cuda", "torch-cpu"):
        import astolfomix_rs as am

        device = {"engine": "cpu", "cuda": "cuda", "torch-cpu": "torch-cpu"}[kind]
        t = time.perf_counter()
        r = am.mean(files, out, threads=a.get("threads"), durable=a.get("durable", False), progress=False,
                    device=device)
        secs = time.perf_counter() - t
        res = {"seconds": secs, "input_bytes": r.bytes_read, "note": r.kernel}
        if kind == "cuda":
            import torch

            res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return res
    if kind in ("naive-torch", "naive-torch-cuda"):
        import torch
        from safetensors.torch import load_file, save_file

        dev = "cuda" if kind.endswith("cuda") else "cpu"
        t = time.perf_counter()
        acc: dict[str, Any] = {}
        for f in files:
            sd = load_file(f, device=dev)
            for k, v in sd.items():
                if not v.is_floating_point():
                    acc.setdefault(k, v)
                elif k in acc:
                    acc[k] += v.float()
                else:
                    acc[k] = v.float()
            del sd
        n = len(files)
        res_sd = {k: (v / n).half().contiguous().cpu() if v.is_floating_point() else v.cpu() for k, v in acc.items()}
        save_file(res_sd, out)
        secs = time.perf_counter() - t
        res = {"seconds": secs, "input_bytes": in_bytes, "note": dev}
        if dev == "cuda":
            res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return res
    if kind == "sd-mecha":
        import sd_mecha  # type: ignore[import-not-found]
        import torch

        t = time.perf_counter()
        models = [sd_mecha.model(f) for f in files]
        sd_mecha.merge(sd_mecha.n_average(*models), output=out, merge_dtype=torch.float32,
                       output_dtype=torch.float16, threads=os.cpu_count())
        return {"seconds": time.perf_counter() - t, "input_bytes": in_bytes, "note": "sd-mecha"}
    if kind == "h2d":
        import torch

        size = 1 << 30
        bw = {}
        for label, pin in (("pinned host->device", True), ("pageable host->device", False)):
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            host.fill_(1)
            gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
            gpu.copy_(host, non_blocking=pin)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                gpu.copy_(host, non_blocking=pin)
            torch.cuda.synchronize()
            bw[label] = 3 * size / (time.perf_counter() - t) / 1e9
        return {"seconds": 0.0, "bandwidth": bw}
    raise SystemExit(f"unknown worker kind {kind}")


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], json.loads(sys.argv[2]))))
