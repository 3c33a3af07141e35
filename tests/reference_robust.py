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
