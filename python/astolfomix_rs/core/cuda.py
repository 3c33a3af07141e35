"""The torch executor: runs the same plans as the Rust engine on CUDA (or, for testing, on the
CPU), and writes through the same Rust streaming writer. The only module that imports torch.

Pipeline per chunk of an output tensor: each source's bytes are copied from the memory map into
a ring of pinned host buffers (a host memcpy, done by a small thread pool), sent to the GPU on a
copy stream, and accumulated in fp32 on the compute stream while the next source is in flight.
The result is converted, copied back into pinned memory and handed to the writer on a writer
thread. GPU memory is bounded by ``gpu_memory`` (default 2 GiB).

Same numbers as the CPU engine: ``acc = acc + x.float()`` in plan order, a true division by a
device tensor holding N (dividing by a Python number would multiply by the rounded reciprocal),
``acc + (w * x)`` as two kernels (``add_(x, alpha=w)`` could fuse into an FMA), and torch's
round-to-nearest-even conversion to the output dtype.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import _core
from ..errors import DeviceError
from .plan import Plan
from .reader import ITEMSIZE
from .report import Report

try:
    import torch
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None  # type: ignore[assignment]

INSTALL_HINT = "the CUDA path needs torch: pip install 'astolfomix_rs[torch]' (or a torch build for your CUDA)"


def _torch_dtypes() -> dict[str, Any]:
    d = {
        "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }
    return {k: v for k, v in d.items() if v is not None}



def resolve_device(device: str):
    """``cuda``, ``cuda:N`` or ``torch-cpu`` -> torch.device, with a clear error when unusable."""
    if torch is None:
        raise DeviceError(INSTALL_HINT)
    if device == "torch-cpu":
        return torch.device("cpu")
    if not device.startswith("cuda"):
        raise DeviceError(f"unknown device '{device}' (use cpu, cuda, cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' asked for, but torch {torch.__version__} sees no CUDA GPU")
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{device}': only {torch.cuda.device_count()} CUDA devices")
    return dev


class _Host:
    """One input of the resolved plan (the same open file, no second open), read with ``pread``
    into torch tensors: never through the map, so a file truncated meanwhile is an error naming
    it, not a SIGBUS."""

    def __init__(self, f: Any):
        self.f = f

    def read_into(self, offset: int, out: Any) -> None:
        self.f.read_into(offset, out.numpy())

    def __getitem__(self, s: slice) -> Any:
        out = torch.empty(s.stop - s.start, dtype=torch.uint8)
        self.read_into(s.start, out)
        return out


def _host_views(layout: _core.Layout) -> list[Any]:
    return [_Host(layout.input(i)) for i in range(layout.n_inputs)]


class _Executor:
    def __init__(self, dev, gpu_memory: int, chunk: int | None, ring: int = 4):
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.tdt = _torch_dtypes()
        # Bytes per element on the GPU, at worst (f64 sources and accumulator): the ring of input
        # slots (8 each), the accumulator (8), the converted source (8), the weighted product (8)
        # and the output (8).
        per_elt = ring * 8 + 8 + 8 + 8 + 8
        self.chunk = max(1024, min(chunk or (1 << 26), gpu_memory // per_elt))
        self.ring = ring
        nbytes = self.chunk * 8
        pin = self.cuda
        self.stage = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(ring)]
        self.dev_in = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(ring)] if self.cuda else self.stage
        self.out_host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(dev)
            self.compute = torch.cuda.current_stream(dev)
            self.h2d_done = [torch.cuda.Event() for _ in range(ring)]
            self.slot_free = [torch.cuda.Event() for _ in range(ring)]
            self.out_ready = [torch.cuda.Event() for _ in range(2)]
        self.slot = 0
        self.out_slot = 0
        self.pending: list[Future | None] = [None, None]

    def _load(self, host: Any, offset: int, nbytes: int, dtype: str, numel: int, f64: bool):
        """Source bytes -> device tensor of fp32 (or fp64), through the pinned ring."""
        k = self.slot
        self.slot = (self.slot + 1) % self.ring
        if self.cuda:
            self.slot_free[k].synchronize()  # the compute stream is done with this slot
            host.read_into(offset, self.stage[k][:nbytes])
            with torch.cuda.stream(self.copy_stream):
                self.dev_in[k][:nbytes].copy_(self.stage[k][:nbytes], non_blocking=True)
                self.h2d_done[k].record(self.copy_stream)
            self.compute.wait_event(self.h2d_done[k])
            raw = self.dev_in[k][:nbytes]
        else:
            # Stage through an aligned buffer: tensors in a file may start at any byte.
            raw = self.stage[k][:nbytes]
            host.read_into(offset, raw)
        x = raw.view(self.tdt[dtype])[:numel]
        x = x.double() if f64 else x.float()
        if self.cuda:
            self.slot_free[k].record(self.compute)
        return x

    def _emit(self, writer, offset: int, result) -> None:
        """Device result -> pinned host buffer -> writer (on the writer thread)."""
        b = self.out_slot
        self.out_slot ^= 1
        if self.pending[b] is not None:
            self.pending[b].result()  # that pinned buffer's previous write is finished
        flat = result.reshape(-1).view(torch.uint8)
        n = flat.numel()
        host = self.out_host[b][:n]
        if self.cuda:
            host.copy_(flat, non_blocking=True)
            self.out_ready[b].record(self.compute)
            ev = self.out_ready[b]
        else:
            host.copy_(flat)
            ev = None

        def write() -> None:
            if ev is not None:
                ev.synchronize()
            writer.write(offset, host.numpy())

        self.pending[b] = self.pool.submit(write)

    def run(self, layout: _core.Layout, hosts: list[Any], writer, progress, exprs: dict[str, tuple]) -> int:
        """Executes the resolved plan: every decision (raw copy, working precision) is the
        resolver's; this only carries it out. ``exprs``: each robust output's expression."""
        done = 0
        total = layout.bytes_read
        with ThreadPoolExecutor(1) as self.pool:
            for idx, (name, out_dt, shape, numel, out_offset, out_len, op, srcs, weights, via) in enumerate(layout.tensors()):
                if op == "expr":
                    done += _Robust(self, hosts, srcs, exprs[name], shape, numel, name, via).run(writer, out_offset, out_dt)
                    if progress is not None:
                        progress(done, total)
                    continue
                if op == "constant":
                    if out_len:
                        writer.write(out_offset, np.frombuffer(layout.constant(idx), dtype=np.uint8))
                    continue
                if op == "copy":
                    # The stored bytes go straight from the map to the writer.
                    i, _, off = srcs[0]
                    if out_len:
                        writer.write(out_offset, hosts[i][off:off + out_len].numpy())
                    done += out_len
                    continue
                f64 = via == "f64"
                acc_dt = torch.float64 if f64 else torch.float32
                # Weights and N as device tensors, made once per tensor: a Python number would be
                # a rounded reciprocal (division) and each per-chunk torch.tensor() a host sync.
                wdev = None if weights is None else torch.tensor(weights, dtype=acc_dt, device=self.dev)
                ndev = torch.tensor(float(len(srcs)), dtype=acc_dt, device=self.dev)
                osz = ITEMSIZE[out_dt]
                for s in range(0, numel, self.chunk):
                    e = min(numel, s + self.chunk)
                    m = e - s
                    if op == "cast":
                        i, d, off = srcs[0]
                        acc = self._load(hosts[i], off + s * ITEMSIZE[d], m * ITEMSIZE[d], d, m, f64)
                    else:
                        # -0.0, addition's identity, as the engine starts: the sign of zero is kept.
                        acc = torch.full((m,), -0.0, dtype=acc_dt, device=self.dev)
                        for k, (i, d, off) in enumerate(srcs):
                            x = self._load(hosts[i], off + s * ITEMSIZE[d], m * ITEMSIZE[d], d, m, f64)
                            if wdev is None:
                                acc.add_(x)
                            else:
                                acc.add_(torch.mul(x, wdev[k]))  # two kernels: no FMA
                        if wdev is None:
                            acc.div_(ndev)
                    self._emit(writer, out_offset + s * osz, acc.to(self.tdt[out_dt]))
                    done += sum(m * ITEMSIZE[d] for _, d, _ in srcs)
                    if progress is not None:
                        progress(done, total)
            for f in self.pending:
                if f is not None:
                    f.result()
        return done


def execute(
    plan: Plan,
    output: str | os.PathLike[str],
    *,
    device: str = "cuda",
    overwrite: bool = False,
    in_place: int | None = None,
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
    gpu_memory: int | None = None,
    chunk: int | None = None,
) -> Report:
    """Executes ``plan`` with torch on ``device`` ("cuda", "cuda:N" or "torch-cpu")."""
    dev = resolve_device(device)
    t0 = time.perf_counter()
    layout = plan.resolve()
    exprs = {o.name: o.expr for o in plan.outputs if o.op == "expr" and o.expr is not None}
    hosts = _host_views(layout)
    writer = _core.Writer(layout, os.fspath(output), overwrite=overwrite, in_place=in_place)
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ex = _Executor(dev, gpu_memory or (2 << 30), chunk)
        read = ex.run(layout, hosts, writer, progress, exprs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        writer.commit(durable)
    finally:
        writer.abort()
    notes: dict[str, Any] = dict(plan.notes)
    if dev.type == "cuda":
        notes["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        notes["gpu_memory_bound"] = int(gpu_memory or (2 << 30))
    return Report(
        output=Path(output), tensors=len(layout), bytes_read=read,
        bytes_written=len(layout.header) + layout.data_len, seconds=time.perf_counter() - t0,
        threads=torch.get_num_threads(), kernel=f"torch {torch.__version__}", device=str(dev), notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Robust merges: the same passes as rust/robust.rs (blocks, thresholds, Gram, Weiszfeld), in
# torch on the device. Sums run in torch's order, so results agree with the CPU engine to f64
# rounding (tested at 1e-12) rather than bit for bit; f64 -> f16 goes through f32 in torch.
# Block sizes, Weiszfeld and the whole-tensor stock factor are the engine's own (`_core.robust_*`).


class _Robust:
    def __init__(self, ex: _Executor, hosts: list[Any], srcs: list, expr: tuple, shape: list[int], numel: int,
                 key: str, via: str = "f64"):
        self.ex, self.hosts, self.srcs, self.numel, self.key, self.shape = ex, hosts, srcs, numel, key, shape
        self.via = via
        self.wd = torch.float64 if via == "f64" else torch.float32  # the working precision
        self.linear, self.terms = expr[0], expr[1]
        self.iso = expr[2] if len(expr) > 2 else []
        self.row = max(shape[-1], 1) if shape else 1
        widest = max((len(pts) for _, _, _, pts in self.terms), default=1)
        rows = any(m == "ties_stock" or (m == "model_stock" and not p.get("whole"))
                   or (p.get("rank_rows") and p.get("della_eps")) for _, m, p, _ in self.terms)
        block = _core.robust_block_len(widest, self.row, rows)
        self.blocks = [(s, min(s + block, numel)) for s in range(0, numel, block)]
        self.read = 0

    def load(self, j: int, s: int, e: int):
        i, d, off = self.srcs[j]
        size = ITEMSIZE[d]
        f64 = self.wd == torch.float64
        x = self.ex._load(self.hosts[i], off + s * size, (e - s) * size, d, e - s, f64)
        self.read += (e - s) * size
        # a source already in the working dtype is a view of the staging ring
        return x.clone() if d == ("F64" if f64 else "F32") else x

    def points(self, pts_terms: list, x: dict, s: int, e: int):
        out = torch.zeros((len(pts_terms), e - s), dtype=self.wd, device=self.ex.dev)
        for i, terms in enumerate(pts_terms):
            for j, c in terms:
                out[i] += c * x[j]
        return out

    def block_sources(self, s: int, e: int, wanted) -> dict:
        return {j: self.load(j, s, e) for j in sorted(wanted)}

    @staticmethod
    def ties(P, params: dict, thr):
        if thr is not None:
            P = torch.where(P.abs() >= thr[:, None], P, torch.zeros_like(P))
        S = torch.sign(P)
        vote = P.sum(0) if params.get("vote_mass") else S.sum(0)
        bad = torch.isnan(P).any(0) | torch.isnan(vote)
        keep = (S == torch.sign(vote)) & ~bad
        return torch.where(keep, P, torch.zeros_like(P)), keep.sum(0).to(P.dtype)

    def mask(self, params: dict, bits, i: int, values, s: int):
        """Point ``i``'s keep mask for elements ``s..``, drawn by the engine's generator (the same
        bits on every executor): from the point's whole-tensor mask bits (DELLA with tensor-wide
        ranks, drawn in the statistics pass), else drawn for the block (the values go through the
        host for row ranks)."""
        if bits is not None:
            m = np.unpackbits(bits[s // 8:(s + values.numel() + 7) // 8 + 1], bitorder="little")
            m = m[s % 8:s % 8 + values.numel()].astype(np.float64)
            return torch.from_numpy(m).to(values.device, self.wd)
        v = values.detach().to("cpu", torch.float64).contiguous().numpy()
        b = _core.robust_mask(v, s, int(params.get("seed", 0)), self.key, i, params["p"], params.get("della_eps", 0.0),
                              bool(params.get("rank_rows")), self.row)
        return torch.frombuffer(bytearray(b), dtype=torch.float64).to(values.device, self.wd)

    def masked(self, params: dict, tables: list, P, s: int):
        """The points of a block times their masks (sd-mecha multiplies: a dropped NaN stays NaN)."""
        if "p" not in params:
            return P
        return torch.stack([P[i] * self.mask(params, tables[i] if tables else None, i, P[i], s)
                            for i in range(P.shape[0])])

    def stats(self, params: dict, pts_terms: list):
        """Per point, one whole tensor at a time: the DELLA mask bits (ranks of the unmasked values), then the
        TIES trim threshold of the masked values."""
        k = params.get("k", 1.0)
        want_table = _della_table(params)
        m = max(int(math.floor((1 - k) * self.numel)), 1)
        thr, tables = [], []
        for i, terms in enumerate(pts_terms):
            vals = []
            for s, e in self.blocks:
                x = self.block_sources(s, e, {j for j, _ in terms})
                vals.append(self.points([terms], x, s, e)[0])
            whole = torch.cat(vals) if vals else torch.zeros(0, dtype=self.wd, device=self.ex.dev)
            table = (np.frombuffer(_core.robust_della_bits(
                whole.to("cpu", torch.float64).numpy(), int(params.get("seed", 0)), self.key, i, params["p"],
                params["della_eps"]), np.uint8) if want_table else None)
            tables.append(table)
            if k < 1.0:
                if "p" in params:
                    whole = torch.cat([whole[s:e] * self.mask(params, table, i, whole[s:e], s) for s, e in self.blocks])
                thr.append(torch.kthvalue(whole.abs().cpu(), m).values.item() if whole.numel() else 0.0)
        t = torch.tensor(thr, dtype=self.wd, device=self.ex.dev) if k < 1.0 else None
        return t, (tables if want_table else [])

    def prepare(self, method: str, params: dict, pts_terms: list):
        thr, tables = None, []
        if (method.startswith("ties") and params.get("k", 1.0) < 1.0) or _della_table(params):
            thr, tables = self.stats(params, pts_terms)
        extra: float | list[float] | None = None  # the stock factor, or the median weights
        if method in ("ties_median", "geometric_median") or (method == "model_stock" and params.get("whole")):
            n = len(pts_terms)
            G = torch.zeros((n, n), dtype=torch.float64, device=self.ex.dev)
            wanted = {j for terms in pts_terms for j, _ in terms}
            for s, e in self.blocks:
                P = self.masked(params, tables, self.points(pts_terms, self.block_sources(s, e, wanted), s, e), s)
                if method == "ties_median":
                    P, _ = self.ties(P, params, thr)
                Pd = P.double()  # products and sums in f64 whatever the precision, as the engine
                G += Pd @ Pd.T
            g = G.cpu().numpy().ravel().tolist()
            if method == "model_stock":
                extra = _core.robust_whole_stock(g, params.get("cos_eps", 1e-6))
            else:
                extra = _core.robust_weiszfeld(g, params.get("eps", 1e-6), int(params.get("maxiter", 100)),
                                               params.get("ftol", 1e-20))
        return thr, tables, extra

    def value(self, method: str, params: dict, pts_terms: list, prep: tuple, x: dict, s: int, e: int):
        thr, tables, extra = prep
        P = self.points(pts_terms, x, s, e)
        n = P.shape[0]
        if method == "masked_mean":  # sd-mecha's dropout: kept values over the kept count
            M = torch.stack([self.mask(params, None, i, P[i], s) for i in range(n)])
            return torch.where(M != 0, P, torch.zeros_like(P)).sum(0) / M.sum(0).clamp(min=1)
        P = self.masked(params, tables, P, s)
        if method.startswith("ties"):
            P, count = self.ties(P, params, thr)
        clean = lambda v: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
        if method == "ties_sum":
            return clean(P.sum(0) / count)
        if method == "ties_stock":
            t = _stock_rows(P.double(), self.row, params["cos_eps"]).to(P.dtype)  # in f64, as the engine
            return clean((P.sum(0).view(-1, self.row) * t).view(-1) / count)
        if method in ("ties_median", "geometric_median"):
            w = torch.tensor(extra, dtype=self.wd, device=P.device)
            v = (P * w[:, None]).sum(0) / w.sum()
            return clean(v) if method == "ties_median" else v
        t = extra if params.get("whole") else _stock_rows(P.double(), self.row, params["cos_eps"]).to(P.dtype)
        mean = P.sum(0) / n
        return clean((mean.view(-1, self.row) * t).view(-1) if not params.get("whole") else t * mean)

    def blocks_values(self, iso_vals: list):
        """(start, end, f64 values) per block: the linear part, the robust terms, the isotropic ones."""
        prepared = [self.prepare(m, p, pts) for _, m, p, pts in self.terms]
        wanted = {j for j, _ in self.linear} | {j for _, _, _, pts in self.terms for terms in pts for j, _ in terms}
        for s, e in self.blocks:
            x = self.block_sources(s, e, wanted)
            acc = torch.zeros(e - s, dtype=self.wd, device=self.ex.dev)
            for j, c in self.linear:
                acc += c * x[j]
            for (a, m, p, pts), prep in zip(self.terms, prepared):
                acc += a * self.value(m, p, pts, prep, x, s, e)
            for (b, _, _), v in zip(self.iso, iso_vals):
                acc += b * v[s:e]
            yield s, e, acc

    def isotropic(self) -> list:
        """Each isotropic term's inner expression over the whole tensor, then its SVD step."""
        out = []
        for _, params, inner in self.iso:
            sub = _Robust(self.ex, self.hosts, self.srcs, inner, self.shape, self.numel, self.key, self.via)
            whole = torch.cat([v for _, _, v in sub.blocks_values([])]) if self.numel else torch.zeros(0, dtype=self.wd)
            self.read += sub.read
            # the SVD step in f64 whatever the precision
            out.append(_isotropic(whole.double(), self.shape, params).to(self.wd))
        return out

    def run(self, writer, out_offset: int, out_dt: str) -> int:
        osz = ITEMSIZE[out_dt]
        for s, _, acc in self.blocks_values(self.isotropic()):
            self.ex._emit(writer, out_offset + s * osz, acc.to(self.ex.tdt[out_dt]))
        return self.read


def _della_table(params: dict) -> bool:
    """DELLA masks with tensor-wide ranks: mask bits drawn in a statistics pass."""
    return bool("p" in params and params.get("della_eps") and not params.get("rank_rows"))


def _isotropic(v, shape: list[int], params: dict):
    """Iso-C / Iso-Z on one whole tensor (see rust/iso.rs): U diag(m + z (S - m)) V^T."""
    two_d = len(shape) == 2 or (len(shape) > 2 and params.get("apply_high_dim"))
    if not two_d or v.numel() == 0 or not bool(torch.isfinite(v).all()):
        return v
    A = v.view(shape[0], -1)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    m = torch.exp(torch.log(S).mean()) if params.get("apply_exp") else S.mean()
    return ((U * (m + params.get("z_cof", 0.0) * (S - m))) @ Vh).reshape(-1)


def _stock_rows(P, row: int, cos_eps: float):
    """Row-wise model stock factor (adjacent pairs), shape [rows, 1]."""
    n = P.shape[0]
    R = P.view(n, -1, row)
    if n == 1:
        return torch.ones((R.shape[1], 1), dtype=P.dtype, device=P.device)
    a, b = R[:-1], R[1:]
    cos = (a * b).sum(-1) / (a.norm(dim=-1).clamp(min=cos_eps) * b.norm(dim=-1).clamp(min=cos_eps))
    c = cos.mean(0)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-9, torch.zeros_like(c), n * c / torch.where(den == 0, torch.ones_like(den), den))
    return t[:, None]
