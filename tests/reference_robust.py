"""Float64 numpy references of the robust methods, written from the definitions in the README
("Robust merges"), independently of the engine: whole tensors, direct distances."""

from __future__ import annotations

import numpy as np


def _clean(r: np.ndarray) -> np.ndarray:
    r = np.array(r, dtype=np.float64)
    r[~np.isfinite(r)] = 0.0
    return r


def ties_filter(ds, k=1.0, vote_mass=False):
    ds = [np.asarray(d, dtype=np.float64) for d in ds]
    if k < 1:
        out = []
        for d in ds:
            a = np.abs(d).ravel()
            m = max(int(np.floor((1 - k) * a.size)), 1)
            t = np.sort(a)[m - 1]
            out.append(np.where(np.abs(d) >= t, d, 0.0))
        ds = out
    D = np.stack(ds)
    S = np.sign(D)
    with np.errstate(invalid="ignore"):
        s = np.sign(D.sum(0) if vote_mass else S.sum(0))
    A = S == s
    return np.where(A, D, 0.0), A.sum(0).astype(np.float64)


def ties_sum(ds, k=1.0, vote_mass=False):
    Y, c = ties_filter(ds, k, vote_mass)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _clean(Y.sum(0) / c)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1) if x.ndim == 0 else x


def stock_t(points, cos_eps=1e-6):
    """Row-wise model stock factor (cosines along the last axis, adjacent pairs)."""
    n = len(points)
    P = [_rows(np.asarray(p, dtype=np.float64)) for p in points]
    if n == 1:
        return np.ones(P[0].shape[:-1] + (1,))
    cs = []
    for a, b in zip(P, P[1:]):
        na = np.maximum(np.sqrt((a * a).sum(-1)), cos_eps)
        nb = np.maximum(np.sqrt((b * b).sum(-1)), cos_eps)
        cs.append((a * b).sum(-1) / (na * nb))
    c = np.mean(cs, axis=0)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-9, 0.0, n * c / np.where(den == 0, 1, den))
    return t[..., None]


def ties_stock(ds, k=1.0, vote_mass=False, cos_eps=1e-6):
    Y, c = ties_filter(ds, k, vote_mass)
    shape = Y.shape[1:]
    t = stock_t(list(Y), cos_eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = _rows(Y.sum(0)) * t / _rows(c)
    return _clean(r.reshape(shape))


def geometric_median(points, eps=1e-6, maxiter=100, ftol=1e-20):
    P = [np.asarray(p, dtype=np.float64) for p in points]
    if not all(np.isfinite(p).all() for p in P):
        return sum(P) / len(P)
    n = len(P)
    w = np.ones(n)

    def avg(w):
        return sum(p * wi for p, wi in zip(P, w)) / w.sum()

    med = avg(w)
    f = np.mean([np.linalg.norm((p - med).ravel()) for p in P])
    for _ in range(maxiter):
        prev = f
        d = np.array([np.linalg.norm((p - med).ravel()) for p in P])
        w = 1.0 / np.maximum(d, eps)
        med = avg(w)
        f = np.mean([np.linalg.norm((p - med).ravel()) for p in P])
        if abs(prev - f) <= ftol * f:
            break
    return med


def ties_median(ds, k=1.0, vote_mass=False, **gm):
    Y, _ = ties_filter(ds, k, vote_mass)
    return _clean(geometric_median(list(Y), **gm))


def model_stock(ds, cos_eps=1e-6, whole=False):
    D = [np.asarray(d, dtype=np.float64) for d in ds]
    n = len(D)
    mean = sum(D) / n
    if not whole:
        return _clean((_rows(mean) * stock_t(D, cos_eps)).reshape(mean.shape))
    if n == 1:
        return _clean(mean)
    cs = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = D[i].ravel(), D[j].ravel()
            cs.append(a @ b / (max(np.linalg.norm(a), cos_eps) * max(np.linalg.norm(b), cos_eps)))
    c = np.mean(cs)
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-9 else n * c / den
    return _clean(t * mean)


# --- Dropout masks (DARE / DELLA), written from README "Robust merges" independently of the engine:
# stream = sha256(b"astolfomix-mask-v1\0" + seed u64 + len(key) u64 + key + model u64)[:12] as 3 u32;
# u = lowbias32(lowbias32(lowbias32(j ^ k0) ^ (j >> 32) ^ k1) ^ k2) / 2^32; keep when u < q.

def _lowbias32(x):
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def stream(seed: int, key: str, model: int) -> tuple[int, int, int]:
    import hashlib
    import struct

    kb = key.encode()
    d = hashlib.sha256(b"astolfomix-mask-v1\0" + struct.pack("<QQ", seed, len(kb)) + kb + struct.pack("<Q", model)).digest()
    return struct.unpack("<III", d[:12])


def draws(seed: int, key: str, model: int, n: int) -> np.ndarray:
    k0, k1, k2 = stream(seed, key, model)
    j = np.arange(n, dtype=np.uint64)
    x = _lowbias32((j & 0xFFFFFFFF) ^ np.uint64(k0))
    x = _lowbias32(x ^ (j >> np.uint64(32)) ^ np.uint64(k1))
    return _lowbias32(x ^ np.uint64(k2)).astype(np.float64) / 2.0**32


def ordinal_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of |a| (ties by position), as scipy's rankdata(method="ordinal")."""
    order = np.lexsort((np.arange(a.size), np.abs(a)))
    r = np.empty(a.size)
    r[order] = np.arange(1, a.size + 1)
    return r


def keep_prob(d: np.ndarray, p: float, della_eps: float = 0.0, rows: bool = False) -> np.ndarray:
    """The exact keep probability of every element of one model's delta tensor."""
    flat = np.asarray(d, np.float64).ravel()
    if della_eps == 0.0:
        return np.full(flat.size, np.clip(1 - p, 0, 1))
    row = (d.shape[-1] if np.ndim(d) else 1) if rows else flat.size
    e = np.zeros(flat.size)
    for s in range(0, flat.size, max(row, 1)):
        seg = flat[s:s + row]
        if np.isnan(seg).any():
            continue
        n = seg.size
        e[s:s + n] = (ordinal_ranks(seg) / n - (n + 1) / (2 * n)) * della_eps
    return np.clip(1 - p + e, 0, 1)


def masks(ds, key: str, seed: int, p: float, della_eps: float = 0.0, rows: bool = False):
    return [(draws(seed, key, i, np.size(d)) < keep_prob(d, p, della_eps, rows)).astype(np.float64).reshape(np.shape(d))
            for i, d in enumerate(ds)]


def ties_dropout(ds, key, seed, p=0.9, della_eps=0.0, rescale=True, k=0.2, vote_mass=False, mode="stock",
                 rows=False, cos_eps=1e-6, maxiter=100):
    """sd-mecha's ties_sum_with_dropout with these masks: masked deltas (multiplied), then
    ties_sum_extended (mode "stock", "sum" or "median"), then / (1 - p) with rescale."""
    ms = masks(ds, key, seed, p, della_eps, rows)
    dd = [np.asarray(d, np.float64) * m for d, m in zip(ds, ms)]
    if mode == "median":
        r = ties_median(dd, k, vote_mass, maxiter=maxiter)
    elif mode == "sum":
        r = ties_sum(dd, k, vote_mass)
    else:
        r = ties_stock(dd, k, vote_mass, cos_eps)
    return r / (1 - p) if rescale and p != 0 else r


def dropout_mean(ds, key, seed, p=0.9, rescale=1.0):
    """sd-mecha's dropout (overlap 1): kept deltas summed, over the kept count (at least 1)."""
    ms = masks(ds, key, seed, p)
    D = np.stack([np.asarray(d, np.float64) for d in ds])
    M = np.stack(ms)
    tot = np.where(M != 0, D, 0.0).sum(0) / np.maximum(M.sum(0), 1)
    return tot / ((1 - p) ** rescale if p != 0 else 1.0)


def isotropic(d, z_cof=0.0, apply_exp=False, apply_high_dim=False):
    """Iso-C / Iso-Z: U diag(m + z (S - m)) V^T of the 2-D (or flattened >2-D) tensor."""
    d = np.asarray(d, np.float64)
    if not (d.ndim == 2 or (d.ndim > 2 and apply_high_dim)) or d.size == 0 or not np.isfinite(d).all():
        return d
    U, S, Vh = np.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
    with np.errstate(divide="ignore"):
        m = np.exp(np.log(S).mean()) if apply_exp else S.mean()
    return ((U * (m + z_cof * (S - m))) @ Vh).reshape(d.shape)
