//! Robust merges as streaming passes over blocks of all N inputs: TIES (trim, sign election,
//! disjoint mean), the geometric median, model stock. None of them needs the N tensors of a key
//! in memory (see README "Robust merges"):
//! - element-wise steps (sign vote, agreement, disjoint mean) need one block of all inputs;
//! - TIES trimming with k < 1 needs a per-point threshold: one pass, one point's tensor at a time;
//! - the geometric median (and whole-tensor model stock) needs the Gram matrix of the N points:
//!   one pass accumulates it, Weiszfeld runs on N-vectors, a second pass writes the result;
//! - row-wise model stock needs whole rows: blocks are cut on row boundaries.
//!
//! Determinism: blocks are a fixed size (whole rows, about 64K elements), independent of the
//! engine's chunk option and of the thread count; each block's Gram partial is summed in block
//! order. So every thread count and chunk size gives the same bits.
//!
//! Numbers: the element-wise loops run in the plan's precision (f64 by default, f32 on request;
//! see [`crate::real`]); the Gram product, Weiszfeld and the stock factors in f64. A robust term
//! whose value is NaN or infinite at an element
//! contributes 0 there (sd-mecha's `nan_to_num` for its TIES methods). Model stock rows where
//! `|1 + (N-1) c| < 1e-9` get `t = 0` (sd-mecha divides by zero there); with one point, `t = 1`.
//! A Gram matrix that is not finite (NaN/Inf inputs) gives the uniform mean's weights.

use rayon::prelude::*;

use crate::dropout::{self, Dropout, Ranks};
use crate::engine::{read_source, Io, Progress};
use crate::error::{Error, Result};
use crate::iso::Iso;
use crate::kernels;
use crate::plan::{Accumulate, Layout, Resolved, SrcRef};
use crate::real::Real;
use crate::writer::Writer;

/// Values per block, all points together: a block's points then stay in the L2 cache across the
/// element-wise steps (512 KB of f64). Elements per block = this / points, at least 1024, rounded
/// to whole rows where a method needs rows. It depends on the recipe only, never on threads or
/// the chunk option, so the Gram sums (and the bits) do not either.
pub const BLOCK_VALUES: usize = 1 << 16;

/// Elements per block for an expression whose widest robust term has `points` points, over a
/// tensor whose rows are `row` long (`rows`: a method needs whole rows). Both executors cut
/// blocks with this, so their Gram sums run over the same blocks.
pub fn block_len(points: usize, row: usize, rows: bool) -> usize {
    let base = (BLOCK_VALUES / points.max(1)).max(1024);
    if rows {
        (base / row.max(1)).max(1) * row.max(1)
    } else {
        base
    }
}

/// TIES trimming and sign election.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ties {
    /// Fraction kept per point (by magnitude, over the whole tensor); 1 keeps everything.
    pub k: f64,
    /// Elect the sign of the sum of the deltas (mass) instead of the sum of their signs (count).
    pub vote_mass: bool,
}

/// Weiszfeld iteration for the geometric median.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Median {
    /// Smallest distance used in a weight (`1 / max(d, eps)`).
    pub eps: f64,
    /// Iterations at most.
    pub maxiter: usize,
    /// Stop when the objective changes by at most `ftol` times itself.
    pub ftol: f64,
}

/// A robust method over N points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// `ties_sum`: sum of the agreeing trimmed deltas over their count.
    TiesSum(Ties),
    /// `ties_sum_extended` with model stock (sd-mecha's `apply_stock=False`): the sum of the
    /// agreeing deltas times the row-wise model stock factor, over their count.
    TiesStock {
        /// Trim and vote.
        ties: Ties,
        /// Norm clamp of the cosines.
        cos_eps: f64,
    },
    /// `ties_sum_extended` with `apply_median`: the geometric median of the agreeing deltas.
    TiesMedian {
        /// Trim and vote.
        ties: Ties,
        /// Weiszfeld parameters.
        median: Median,
    },
    /// `geometric_median` of the points.
    GeometricMedian(Median),
    /// sd-mecha's `dropout` (DARE without TIES): the sum of the kept points over how many were
    /// kept (at least 1). Needs the node's dropout.
    MaskedMean,
    /// `model_stock`: the mean times the model stock factor, row-wise over adjacent pairs
    /// (sd-mecha) or over the whole tensor and all pairs (`whole`, mergekit).
    ModelStock {
        /// Norm clamp of the cosines.
        cos_eps: f64,
        /// Whole tensor, all pairs.
        whole: bool,
    },
}

impl Method {
    fn ties(&self) -> Option<Ties> {
        match *self {
            Method::TiesSum(t) | Method::TiesStock { ties: t, .. } | Method::TiesMedian { ties: t, .. } => Some(t),
            _ => None,
        }
    }

    fn median(&self) -> Option<Median> {
        match *self {
            Method::TiesMedian { median, .. } | Method::GeometricMedian(median) => Some(median),
            _ => None,
        }
    }

    fn needs_rows(&self) -> bool {
        matches!(self, Method::TiesStock { .. } | Method::ModelStock { whole: false, .. })
    }

    /// Checks the parameters.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(t) = self.ties() {
            if !(t.k > 0.0 && t.k <= 1.0) {
                return Err(format!("k must be in (0, 1], not {}", t.k));
            }
        }
        if let Some(m) = self.median() {
            let ok = m.eps > 0.0 && m.eps.is_finite() && m.ftol >= 0.0 && m.maxiter <= 100_000;
            if !ok {
                return Err(format!(
                    "geometric median needs eps > 0, ftol >= 0, maxiter <= 100000 (got {m:?})"
                ));
            }
        }
        if let Method::TiesStock { cos_eps, .. } | Method::ModelStock { cos_eps, .. } = *self {
            if !(cos_eps > 0.0 && cos_eps.is_finite()) {
                return Err(format!("cos_eps must be > 0, not {cos_eps}"));
            }
        }
        Ok(())
    }
}

/// A robust node: N points, each a linear combination of the output's sources.
#[derive(Clone, Debug)]
pub struct Robust {
    /// Point i = sum of `coef * source` over its terms.
    pub points: Vec<Vec<(usize, f64)>>,
    /// The method.
    pub method: Method,
    /// DARE / DELLA masks applied to every point first (point i is model i of the streams).
    pub dropout: Option<Dropout>,
}

impl Robust {
    fn needs_rows(&self) -> bool {
        self.method.needs_rows() || self.dropout.is_some_and(|d| d.rows && d.della_eps != 0.0)
    }

    /// Whether a statistics pass (one tensor of one point at a time) must run first.
    fn needs_stats(&self) -> bool {
        self.method.ties().is_some_and(|t| t.k < 1.0) || self.dropout.is_some_and(|d| d.needs_table())
    }
}

/// An output tensor made of a linear part, robust terms and isotropic terms:
/// `sum lin_j x_j + sum a_r R_r + sum b_i Iso_i(inner_i)`.
#[derive(Clone, Debug, Default)]
pub struct Expr {
    /// (source, coefficient), added in this order.
    pub linear: Vec<(usize, f64)>,
    /// (coefficient, node), added after the linear part, in this order.
    pub robust: Vec<(f64, Robust)>,
    /// Isotropic steps over inner expressions (which have none themselves), added last.
    pub iso: Vec<IsoTerm>,
}

/// `coef * Iso(inner)`: the inner expression computed over the whole tensor, then the SVD step.
#[derive(Clone, Debug)]
pub struct IsoTerm {
    /// Its coefficient in the outer expression.
    pub coef: f64,
    /// The step's parameters.
    pub iso: Iso,
    /// What it is applied to.
    pub inner: Expr,
}

impl Expr {
    /// Input bytes all passes read, given each source's byte length: the output pass, plus a
    /// Gram pass per median or whole-tensor stock term, plus a threshold pass per trimmed point.
    pub fn bytes_read(&self, source_bytes: &[u64]) -> u64 {
        let all: u64 = source_bytes.iter().sum();
        let mut total = all + self.iso.iter().map(|t| t.inner.bytes_read(source_bytes)).sum::<u64>();
        for (_, r) in &self.robust {
            if r.method.median().is_some() || matches!(r.method, Method::ModelStock { whole: true, .. }) {
                total += all;
            }
            if r.needs_stats() {
                total += r
                    .points
                    .iter()
                    .flatten()
                    .map(|&(j, _)| source_bytes.get(j).copied().unwrap_or(0))
                    .sum::<u64>();
            }
        }
        total
    }

    /// Checks source indices and parameters against `n_sources`.
    pub fn check(&self, n_sources: usize) -> std::result::Result<(), String> {
        let bad = |&(s, c): &(usize, f64)| s >= n_sources || !c.is_finite();
        if self.linear.iter().any(bad) {
            return Err("a linear term names a missing source or has a non-finite coefficient".into());
        }
        for (a, r) in &self.robust {
            if !a.is_finite() {
                return Err(format!("robust term coefficient {a} is not finite"));
            }
            if r.points.is_empty() {
                return Err("a robust node has no points".into());
            }
            if r.points.iter().any(|p| p.iter().any(bad)) {
                return Err("a robust point names a missing source or has a non-finite coefficient".into());
            }
            r.method.check()?;
            if let Some(d) = &r.dropout {
                d.check()?;
            }
            if r.method == Method::MaskedMean && r.dropout.is_none() {
                return Err("the dropout method needs its masks".into());
            }
        }
        for t in &self.iso {
            if !t.coef.is_finite() {
                return Err(format!("isotropic term coefficient {} is not finite", t.coef));
            }
            if !t.inner.iso.is_empty() {
                return Err("an isotropic step of an isotropic step is not supported".into());
            }
            t.iso.check()?;
            t.inner.check(n_sources)?;
        }
        Ok(())
    }
}

/// What a robust term needs before the output pass.
struct Prepared<T> {
    /// Per point: its mask stream, and (DELLA, tensor-wide ranks) its whole mask as bits, drawn
    /// once in the statistics pass where the rank table is at hand.
    streams: Vec<[u32; 3]>,
    bits: Vec<Vec<u64>>,
    /// Per point: keep |p| >= thr (TIES with k < 1).
    thresholds: Option<Vec<T>>,
    /// Median weights (unnormalised, computed in f64), or the whole-tensor model stock factor
    /// in `stock`.
    weights: Option<Vec<T>>,
    stock: Option<T>,
}

/// Runs one expression tensor in the working precision `via`: each isotropic term's inner
/// expression into a whole tensor (its own passes, then the SVD step), the statistics passes the
/// robust terms need, then the output pass. Returns the input bytes read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_expr(
    layout: &Layout,
    t: &Resolved,
    sources: &[SrcRef],
    expr: &Expr,
    via: Accumulate,
    io: Io,
    writer: &Writer,
    progress: &Progress,
) -> Result<u64> {
    let row = t.shape.last().copied().unwrap_or(1).max(1);
    let ctx = Ctx {
        layout,
        sources,
        io,
        progress,
        key: &t.name,
        row,
    };
    match via {
        Accumulate::F64 => run_expr_in::<f64>(&ctx, t, expr, writer),
        Accumulate::F32 => run_expr_in::<f32>(&ctx, t, expr, writer),
    }
}

fn run_expr_in<T: Work>(ctx: &Ctx<'_>, t: &Resolved, expr: &Expr, writer: &Writer) -> Result<u64> {
    let mut read = 0u64;
    let mut iso_vals: Vec<Vec<T>> = Vec::with_capacity(expr.iso.len());
    for term in &expr.iso {
        let mut buf = vec![T::ZERO; t.numel];
        let blocks = blocks_of(&term.inner, t.numel, ctx.row);
        let (prepared, n) = prepare_all::<T>(ctx, &term.inner, &blocks, t.numel)?;
        read += n;
        let block = blocks.first().map_or(1, |b| b.1 - b.0).max(1);
        let parts: Vec<u64> = buf
            .par_chunks_mut(block)
            .zip(blocks.par_iter())
            .map(|(dst, &(s, e))| {
                T::with_scratch(|sc| -> Result<u64> {
                    let n = block_value(ctx, &term.inner, &prepared, &[], s, e, sc)?;
                    dst.copy_from_slice(&sc.acc);
                    Ok(n)
                })
            })
            .collect::<Result<_>>()?;
        read += parts.iter().sum::<u64>();
        // The SVD step runs in f64 whatever the precision.
        let mut whole: Vec<f64> = buf.iter().map(|v| v.to_f64()).collect();
        drop(buf);
        term.iso.apply(&mut whole, &t.shape).map_err(|reason| Error::Mismatch {
            tensor: t.name.clone(),
            reason,
        })?;
        iso_vals.push(whole.into_iter().map(T::from_f64).collect());
    }
    let blocks = blocks_of(expr, t.numel, ctx.row);
    let (prepared, n) = prepare_all::<T>(ctx, expr, &blocks, t.numel)?;
    read += n;
    let osz = t.dtype.size();
    let out_read: Vec<u64> = blocks
        .par_iter()
        .map(|&(s, e)| -> Result<u64> {
            T::with_scratch(|sc| {
                let n = block_value(ctx, expr, &prepared, &iso_vals, s, e, sc)?;
                sc.out.resize((e - s) * osz, 0);
                T::finish(&mut sc.acc, &mut sc.out, t.dtype);
                writer.write_at((t.out_offset + s * osz) as u64, &sc.out)?;
                Ok(n)
            })
        })
        .collect::<Result<_>>()?;
    Ok(read + out_read.iter().sum::<u64>())
}

/// The fixed blocks of an expression over a tensor of `numel` elements (see [`block_len`]).
fn blocks_of(expr: &Expr, numel: usize, row: usize) -> Vec<(usize, usize)> {
    let rows = expr.robust.iter().any(|(_, r)| r.needs_rows());
    let widest = expr.robust.iter().map(|(_, r)| r.points.len()).max().unwrap_or(1);
    let block = block_len(widest, row, rows).max(1);
    (0..numel).step_by(block).map(|s| (s, (s + block).min(numel))).collect()
}

/// The statistics passes of every robust term of `expr`.
fn prepare_all<T: Work>(ctx: &Ctx<'_>, expr: &Expr, blocks: &[(usize, usize)], numel: usize) -> Result<(Vec<Prepared<T>>, u64)> {
    let mut read = 0u64;
    let mut prepared = Vec::with_capacity(expr.robust.len());
    for (_, r) in &expr.robust {
        let (p, n) = prepare(ctx, r, blocks, numel)?;
        read += n;
        prepared.push(p);
    }
    Ok((prepared, read))
}

/// The expression's value at elements `[s, e)` (isotropic terms read from their whole tensors),
/// into `sc.acc`. Returns the bytes read.
fn block_value<T: Work>(
    ctx: &Ctx<'_>,
    expr: &Expr,
    prepared: &[Prepared<T>],
    iso_vals: &[Vec<T>],
    s: usize,
    e: usize,
    sc: &mut Scratch<T>,
) -> Result<u64> {
    ctx.check_cancel()?;
    let n = ctx.load(s, e, sc)?;
    let len = e - s;
    let mut acc = std::mem::take(&mut sc.acc);
    acc.clear();
    acc.resize(len, T::ZERO);
    for &(j, c) in &expr.linear {
        let c = T::from_f64(c);
        acc.iter_mut().zip(&sc.x[j]).for_each(|(a, &v)| *a += c * v);
    }
    for ((a, r), p) in expr.robust.iter().zip(prepared) {
        evaluate(r, p, s, len, ctx.row, sc);
        let a = T::from_f64(*a);
        acc.iter_mut().zip(sc.vals.iter()).for_each(|(o, &v)| *o += a * v);
    }
    for (term, vals) in expr.iso.iter().zip(iso_vals) {
        let c = T::from_f64(term.coef);
        acc.iter_mut().zip(&vals[s..e]).for_each(|(o, &v)| *o += c * v);
    }
    sc.acc = acc;
    Ok(n)
}

/// Per-thread buffers, reused across blocks (fresh 512 KB vectors per block cost page faults).
#[derive(Default)]
struct Scratch<T> {
    x: Vec<Vec<T>>,
    buf: Vec<u8>,
    pts: Vec<T>,
    count: Vec<T>,
    vals: Vec<T>,
    mask: Vec<T>,
    acc: Vec<T>,
    out: Vec<u8>,
    votes: Votes<T>,
}

struct Ctx<'a> {
    layout: &'a Layout,
    sources: &'a [SrcRef],
    io: Io,
    progress: &'a Progress,
    /// The output tensor's name (mask streams are keyed by it) and row length.
    key: &'a str,
    row: usize,
}

impl Ctx<'_> {
    /// `Cancelled` once the run was interrupted (Ctrl-C, SIGTERM), checked before each block.
    fn check_cancel(&self) -> Result<()> {
        if self.progress.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Elements `[s, e)` of every source, in the working precision, into `sc.x`; returns the
    /// bytes read.
    fn load<T: Real>(&self, s: usize, e: usize, sc: &mut Scratch<T>) -> Result<u64> {
        self.load_some(0..self.sources.len(), s, e, sc)
    }

    /// Elements `[s, e)` of the sources `which` names, in that order, into `sc.x`.
    fn load_some<T: Real>(
        &self,
        which: impl ExactSizeIterator<Item = usize>,
        s: usize,
        e: usize,
        sc: &mut Scratch<T>,
    ) -> Result<u64> {
        let mut n = 0u64;
        sc.x.resize_with(which.len(), Vec::new);
        for (r, v) in which.map(|j| &self.sources[j]).zip(sc.x.iter_mut()) {
            v.resize(e - s, T::ZERO);
            n += read_source(self.layout, r, s, e, self.io, &mut sc.buf, |bytes| T::load(v, bytes, r.dtype))?;
        }
        self.progress.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// All points of a block, point-major (`pts[i * len + e]`): every element-wise step below is a
/// loop over contiguous elements that the compiler vectorizes.
#[inline(always)]
fn points_impl<T: Work>(r: &Robust, x: &[Vec<T>], len: usize, pts: &mut [T]) {
    for (terms, p) in r.points.iter().zip(pts.chunks_exact_mut(len.max(1))) {
        point_into(terms, x, len, p);
    }
}

/// One point of a block into `p`: the sum of its terms, in term order.
#[inline(always)]
fn point_into<T: Work>(terms: &[(usize, f64)], x: &[Vec<T>], len: usize, p: &mut [T]) {
    match terms {
        // The common shape, a delta `m - b`: one pass, the same bits as the general loop.
        [(a, ca), (b, cb)] => {
            let (xa, xb) = (&x[*a][..len], &x[*b][..len]);
            let (ca, cb) = (T::from_f64(*ca), T::from_f64(*cb));
            for ((o, &va), &vb) in p.iter_mut().zip(xa).zip(xb) {
                *o = T::ZERO + ca * va + cb * vb;
            }
        }
        _ => {
            p.iter_mut().for_each(|v| *v = T::ZERO);
            for &(j, c) in terms {
                let c = T::from_f64(c);
                p.iter_mut().zip(&x[j][..len]).for_each(|(o, &v)| *o += c * v);
            }
        }
    }
}

/// Whether the element-wise loops may use AVX2 (detected once; `ASTOLFOMIX_KERNEL=scalar` turns
/// it off as for the kernels). The loops are the same code compiled twice; the bits are the same
/// (IEEE operations in the same order, and Rust never fuses a multiply-add). AVX-512 builds of
/// these loops measured slower here (7.1-7.8 s vs 6.4-6.6 s for N=8 SDXL/4), so they stay at AVX2.
fn avx2() -> bool {
    kernels::Level::detect().has_avx2()
}

macro_rules! dispatch {
    ($name:ident, $avx:ident, $imp:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx<T: Work>($($arg: $ty),*) {
            $imp($($arg),*)
        }

        fn $name<T: Work>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 was detected on this CPU.
                return unsafe { $avx($($arg),*) };
            }
            $imp($($arg),*)
        }
    };
}

dispatch!(points_to, points_avx2, points_impl, (r: &Robust, x: &[Vec<T>], len: usize, pts: &mut [T]));

/// [`points_to`] into `pts`, sized to hold them.
fn points<T: Work>(r: &Robust, x: &[Vec<T>], len: usize, pts: &mut Vec<T>) {
    pts.resize(len * r.points.len(), T::ZERO);
    points_to(r, x, len, pts);
}
dispatch!(ties_filter, ties_filter_avx2, ties_filter_impl, (pts: &mut [T], len: usize, ties: Ties, thr: Option<&[T]>, want_count: bool, count: &mut Vec<T>, v: &mut Votes<T>));
dispatch!(ties_vote, ties_vote_avx2, ties_vote_impl, (pts: &mut [T], len: usize, ties: Ties, thr: Option<&[T]>, v: &mut Votes<T>));
dispatch!(weighted_sum, weighted_sum_avx2, weighted_sum_impl, (pts: &[T], len: usize, w: Option<&[T]>, vals: &mut Vec<T>));

/// Per-element vote buffers for [`ties_filter`].
#[derive(Default)]
struct Votes<T> {
    vote: Vec<T>,
    bad: Vec<T>,
}

#[inline(always)]
fn isign<T: Real>(x: T) -> T {
    // Selects, not integer casts: they compile to compare-and-mask vector code.
    (if x > T::ZERO { T::ONE } else { T::ZERO }) - (if x < T::ZERO { T::ONE } else { T::ZERO })
}

/// The elected sign of an element that agrees with nothing (a NaN point or a NaN mass vote):
/// no `isign` equals it.
#[inline(always)]
fn no_sign<T: Real>() -> T {
    T::ONE + T::ONE
}

/// TIES on point-major points, in place: trim (|d| below the point's threshold becomes 0, NaN
/// too), elect the sign (count or mass; sign(0) = 0), zero the points that disagree. A NaN point or
/// a NaN mass vote makes the whole element disagree. With `want_count`, fills the count of
/// agreeing points per element (only the TIES means divide by it).
/// Branch-free: signs are random, and mispredicted branches dominated this step.
#[inline(always)]
fn ties_filter_impl<T: Work>(
    pts: &mut [T],
    len: usize,
    ties: Ties,
    thr: Option<&[T]>,
    want_count: bool,
    count: &mut Vec<T>,
    v: &mut Votes<T>,
) {
    ties_vote_impl(pts, len, ties, thr, v);
    if want_count {
        count.clear();
        count.resize(len, T::ZERO);
    }
    for p in pts.chunks_exact_mut(len.max(1)) {
        T::keep_agreeing(p, &v.vote, want_count.then_some(&mut count[..]));
    }
}

/// TIES trim (in place) and sign election into `v.vote`: per element the elected sign, or
/// [`NO_SIGN`] where nothing agrees.
#[inline(always)]
fn ties_vote_impl<T: Work>(pts: &mut [T], len: usize, ties: Ties, thr: Option<&[T]>, v: &mut Votes<T>) {
    if let Some(thr) = thr {
        for (p, &t) in pts.chunks_exact_mut(len.max(1)).zip(thr) {
            p.iter_mut().for_each(|d| *d = if d.abs() >= t { *d } else { T::ZERO });
        }
    }
    v.vote.clear();
    v.vote.resize(len, T::ZERO);
    // Loops over contiguous elements with no branches, so they vectorize. A mass vote is NaN when
    // any point is; a count vote needs its own NaN tally.
    if ties.vote_mass {
        for p in pts.chunks_exact(len.max(1)) {
            v.vote.iter_mut().zip(p).for_each(|(vote, &d)| *vote += d);
        }
        v.vote
            .iter_mut()
            .for_each(|s| *s = if s.is_nan() { no_sign() } else { isign(*s) });
    } else {
        v.bad.clear();
        v.bad.resize(len, T::ZERO);
        for p in pts.chunks_exact(len.max(1)) {
            v.vote.iter_mut().zip(v.bad.iter_mut()).zip(p).for_each(|((vote, bad), &d)| {
                *vote += isign(d);
                *bad += if d.is_nan() { T::ONE } else { T::ZERO };
            });
        }
        v.vote
            .iter_mut()
            .zip(&v.bad)
            .for_each(|(s, &bad)| *s = if bad != T::ZERO { no_sign() } else { isign(*s) });
    }
}

/// The agreeing part of one point: `d` where `isign(d) == s`, else 0 (the bits of `d` kept:
/// -0.0 stays), written back to `p`. With `count`, adds 1 per kept element.
#[inline(always)]
fn keep_agreeing_portable<T: Real>(p: &mut [T], s: &[T], mut count: Option<&mut [T]>) {
    for (e, (d, &s)) in p.iter_mut().zip(s).enumerate() {
        let keep = isign(*d) == s;
        if let Some(c) = count.as_deref_mut() {
            c[e] += if keep { T::ONE } else { T::ZERO };
        }
        *d = if keep { *d } else { T::ZERO };
    }
}

/// The agreeing parts of all points summed, element by element: `vals[e] = 0 + kept_0 w_0 +
/// kept_1 w_1 + ...` (weights 1 without `w`), and with `count` the kept count, from element `from`
/// on. The same operations in the same order as [`keep_agreeing_portable`] point after point into
/// zeroed sums, in one pass (no zeroing, no sums read back per point).
#[inline(always)]
fn agreeing_sum_portable<T: Real>(
    pts: &[T],
    len: usize,
    s: &[T],
    w: Option<&[T]>,
    mut count: Option<&mut [T]>,
    vals: &mut [T],
    from: usize,
) {
    let np = pts.len().checked_div(len).unwrap_or(0);
    for e in from..len {
        let (mut acc, mut c) = (T::ZERO, T::ZERO);
        for i in 0..np {
            let d = pts[i * len + e];
            let keep = isign(d) == s[e];
            acc += (if keep { d } else { T::ZERO }) * w.map_or(T::ONE, |w| w[i]);
            c += if keep { T::ONE } else { T::ZERO };
        }
        vals[e] = acc;
        if let Some(cn) = count.as_deref_mut() {
            cn[e] = c;
        }
    }
}

/// The working precision of the loops here: [`Real`] plus this thread's scratch buffers and the
/// agreeing step.
trait Work: Real {
    /// Runs `f` with this thread's scratch buffers of this precision: kept for the thread's life,
    /// because freeing and re-allocating them per block made glibc return and re-fault the pages
    /// (a third of the time).
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<Self>) -> R) -> R;

    /// [`keep_agreeing_portable`] with AVX2 where present. Written with intrinsics because the
    /// compiler turns the in-place select into masked stores (`vmaskmovpd`), which are microcoded
    /// on AMD and took half of this step's time; the same compare-and-mask gives the same bits.
    fn keep_agreeing(p: &mut [Self], s: &[Self], count: Option<&mut [Self]>);

    /// [`agreeing_sum_portable`] over a whole block (`vals` and `count` `len` long), with AVX2
    /// where present.
    fn agreeing_sum(pts: &[Self], len: usize, s: &[Self], w: Option<&[Self]>, count: Option<&mut [Self]>, vals: &mut [Self]);
}

thread_local! {
    static SCRATCH64: std::cell::RefCell<Scratch<f64>> = std::cell::RefCell::new(Scratch::default());
    static SCRATCH32: std::cell::RefCell<Scratch<f32>> = std::cell::RefCell::new(Scratch::default());
}

/// [`Work`] for one precision: its thread's scratch buffers and its AVX2 agreeing step.
macro_rules! work {
    ($t:ty, $scratch:ident, $avx2:ident, $sum_avx2:ident) => {
        impl Work for $t {
            fn with_scratch<R>(f: impl FnOnce(&mut Scratch<$t>) -> R) -> R {
                $scratch.with(|sc| f(&mut sc.borrow_mut()))
            }

            fn keep_agreeing(p: &mut [$t], s: &[$t], count: Option<&mut [$t]>) {
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: AVX2 was detected on this CPU.
                    return unsafe { x86::$avx2(p, s, count) };
                }
                keep_agreeing_portable(p, s, count)
            }

            fn agreeing_sum(pts: &[$t], len: usize, s: &[$t], w: Option<&[$t]>, count: Option<&mut [$t]>, vals: &mut [$t]) {
                let np = pts.len().checked_div(len).unwrap_or(0);
                assert!(s.len() >= len && vals.len() >= len && w.map_or(true, |w| w.len() >= np));
                assert!(count.as_deref().map_or(true, |c| c.len() >= len) && pts.len() == np * len);
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: AVX2 was detected on this CPU; the lengths were checked.
                    return unsafe { x86::$sum_avx2(pts, len, s, w, count, vals) };
                }
                agreeing_sum_portable(pts, len, s, w, count, vals, 0)
            }
        }
    };
}

work!(f64, SCRATCH64, keep_agreeing_f64, agreeing_sum_f64);
work!(f32, SCRATCH32, keep_agreeing_f32, agreeing_sum_f32);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{agreeing_sum_portable, keep_agreeing_portable};

    /// [`agreeing_sum_portable`] `$w` elements at a time: the lanes' sums and counts stay in
    /// registers across the points. The caller checked the lengths.
    macro_rules! agreeing_sum_avx2 {
        ($name:ident, $t:ty, $w:expr, $set1:ident, $zero:ident, $load:ident, $store:ident, $and:ident, $cmp:ident, $sub:ident, $add:ident, $mul:ident) => {
            #[target_feature(enable = "avx2")]
            pub(super) fn $name(
                pts: &[$t],
                len: usize,
                s: &[$t],
                w: Option<&[$t]>,
                mut count: Option<&mut [$t]>,
                vals: &mut [$t],
            ) {
                let np = pts.len().checked_div(len).unwrap_or(0);
                let full = len / $w * $w;
                let (one, zero) = ($set1(1.0), $zero());
                for e in (0..full).step_by($w) {
                    // SAFETY: e + $w <= len, and every slice holds len elements (pts np rows).
                    unsafe {
                        let sv = $load(s.as_ptr().add(e));
                        let (mut acc, mut c) = (zero, zero);
                        for i in 0..np {
                            let d = $load(pts.as_ptr().add(i * len + e));
                            let pos = $and($cmp::<_CMP_GT_OQ>(d, zero), one);
                            let neg = $and($cmp::<_CMP_LT_OQ>(d, zero), one);
                            let keep = $cmp::<_CMP_EQ_OQ>($sub(pos, neg), sv);
                            let wi = $set1(w.map_or(1.0, |w| *w.get_unchecked(i)));
                            acc = $add(acc, $mul($and(d, keep), wi));
                            c = $add(c, $and(keep, one));
                        }
                        $store(vals.as_mut_ptr().add(e), acc);
                        if let Some(cn) = count.as_deref_mut() {
                            $store(cn.as_mut_ptr().add(e), c);
                        }
                    }
                }
                agreeing_sum_portable(pts, len, s, w, count, vals, full);
            }
        };
    }

    /// One AVX2 agreeing step per lane width: `$w` lanes of `$t`.
    macro_rules! keep_agreeing_avx2 {
        ($name:ident, $t:ty, $w:expr, $set1:ident, $zero:ident, $load:ident, $store:ident, $and:ident, $cmp:ident, $sub:ident, $add:ident, $mul:ident) => {
            #[target_feature(enable = "avx2")]
            pub(super) fn $name(p: &mut [$t], s: &[$t], mut count: Option<&mut [$t]>) {
                let n = p
                    .len()
                    .min(s.len())
                    .min(count.as_deref().map_or(usize::MAX, |c| c.len()));
                let full = n / $w * $w;
                let (one, zero) = ($set1(1.0), $zero());
                for i in (0..full).step_by($w) {
                    // SAFETY: i + $w <= n, and n is within every slice read or written.
                    unsafe {
                        let d = $load(p.as_ptr().add(i));
                        let sv = $load(s.as_ptr().add(i));
                        let pos = $and($cmp::<_CMP_GT_OQ>(d, zero), one);
                        let neg = $and($cmp::<_CMP_LT_OQ>(d, zero), one);
                        let keep = $cmp::<_CMP_EQ_OQ>($sub(pos, neg), sv);
                        $store(p.as_mut_ptr().add(i), $and(d, keep));
                        if let Some(c) = count.as_deref_mut() {
                            let cp = c.as_mut_ptr().add(i);
                            $store(cp, $add($load(cp), $and(keep, one)));
                        }
                    }
                }
                keep_agreeing_portable(&mut p[full..n], &s[full..n], count.map(|c| &mut c[full..n]));
            }
        };
    }

    /// Instantiates an AVX2 step macro for f64 (4 lanes) and f32 (8 lanes), as the functions
    /// named `$f64` and `$f32`: each width's intrinsics are listed once.
    macro_rules! both_widths {
        ($step:ident, $f64:ident, $f32:ident) => {
            $step!(
                $f64,
                f64,
                4,
                _mm256_set1_pd,
                _mm256_setzero_pd,
                _mm256_loadu_pd,
                _mm256_storeu_pd,
                _mm256_and_pd,
                _mm256_cmp_pd,
                _mm256_sub_pd,
                _mm256_add_pd,
                _mm256_mul_pd
            );
            $step!(
                $f32,
                f32,
                8,
                _mm256_set1_ps,
                _mm256_setzero_ps,
                _mm256_loadu_ps,
                _mm256_storeu_ps,
                _mm256_and_ps,
                _mm256_cmp_ps,
                _mm256_sub_ps,
                _mm256_add_ps,
                _mm256_mul_ps
            );
        };
    }

    both_widths!(agreeing_sum_avx2, agreeing_sum_f64, agreeing_sum_f32);
    both_widths!(keep_agreeing_avx2, keep_agreeing_f64, keep_agreeing_f32);
}

fn finite_or_zero<T: Real>(v: T) -> T {
    if v.is_finite() {
        v
    } else {
        T::ZERO
    }
}

/// Model stock factor per row of point-major points (adjacent pairs, cosines along the row), in
/// f64 whatever the precision: the factor is singular where the mean cosine is -1/(N-1) (two
/// opposite points), and f32 sums would miss the exact singular case.
fn stock_rows<T: Work>(pts: &[T], n: usize, len: usize, row: usize, cos_eps: f64) -> Vec<T> {
    (0..len / row)
        .map(|k| {
            if n == 1 {
                return T::ONE;
            }
            let rng = k * row..(k + 1) * row;
            let mut c = 0.0;
            for i in 0..n - 1 {
                let (a, b) = (&pts[i * len..][rng.clone()], &pts[(i + 1) * len..][rng.clone()]);
                let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
                for (&x, &y) in a.iter().zip(b) {
                    let (x, y) = (x.to_f64(), y.to_f64());
                    dot += x * y;
                    na += x * x;
                    nb += y * y;
                }
                c += dot / (na.sqrt().max(cos_eps) * nb.sqrt().max(cos_eps));
            }
            T::from_f64(stock_factor(n, c / (n - 1) as f64))
        })
        .collect()
}

/// `N c / (1 + (N-1) c)`, or 0 where the denominator is below 1e-9 (sd-mecha divides by zero
/// there).
fn stock_factor(n: usize, c: f64) -> f64 {
    let den = 1.0 + (n as f64 - 1.0) * c;
    if den.abs() < 1e-9 {
        0.0
    } else {
        n as f64 * c / den
    }
}

/// `vals[e] = sum_i w_i * pts[i][e]` (w = 1 when None), summed in point order.
#[inline(always)]
fn weighted_sum_impl<T: Work>(pts: &[T], len: usize, w: Option<&[T]>, vals: &mut Vec<T>) {
    vals.clear();
    vals.resize(len, T::ZERO);
    for (i, p) in pts.chunks_exact(len.max(1)).enumerate() {
        match w {
            Some(w) => vals.iter_mut().zip(p).for_each(|(o, &y)| *o += y * w[i]),
            None => vals.iter_mut().zip(p).for_each(|(o, &y)| *o += y),
        }
    }
}

/// The block's points (elements `s..s + len`), each times its dropout mask: [`points`] then
/// [`drop_points`], in one loop where the masks are a statistics pass's bits.
#[allow(clippy::too_many_arguments)]
fn points_dropped<T: Work>(
    r: &Robust,
    p: &Prepared<T>,
    x: &[Vec<T>],
    s: usize,
    len: usize,
    row: usize,
    pts: &mut Vec<T>,
    mask: &mut Vec<T>,
) {
    if r.dropout.is_some() && p.bits.len() == r.points.len() {
        pts.resize(len * r.points.len(), T::ZERO);
        points_bits(r, x, len, &p.bits, s, pts);
    } else {
        points(r, x, len, pts);
        drop_points(r, p, pts, s, len, row, mask);
    }
}

dispatch!(points_bits, points_bits_avx2, points_bits_impl, (r: &Robust, x: &[Vec<T>], len: usize, bits: &[Vec<u64>], s: usize, pts: &mut [T]));

/// [`points_impl`] with each value times its bit, as [`times_bits_impl`] multiplies (the
/// same operations in the same order: the same bits); a delta in one loop.
#[inline(always)]
fn points_bits_impl<T: Work>(r: &Robust, x: &[Vec<T>], len: usize, bits: &[Vec<u64>], s: usize, pts: &mut [T]) {
    for ((terms, p), b) in r.points.iter().zip(pts.chunks_exact_mut(len.max(1))).zip(bits) {
        let [(a, ca), (c, cc)] = terms.as_slice() else {
            point_into(terms, x, len, p);
            times_bits_impl(p, b, s);
            continue;
        };
        let (xa, xc) = (&x[*a][..len], &x[*c][..len]);
        let (ca, cc) = (T::from_f64(*ca), T::from_f64(*cc));
        let mut e = 0;
        while e < len {
            let j = s + e;
            let (word, off) = (b[j / 64], j % 64);
            let take = (64 - off).min(len - e);
            let w = e..e + take;
            for (k, ((o, &va), &vc)) in p[w.clone()].iter_mut().zip(&xa[w.clone()]).zip(&xc[w]).enumerate() {
                *o = (T::ZERO + ca * va + cc * vc) * T::one_if((word >> (off + k)) & 1);
            }
            e += take;
        }
    }
}

/// Multiplies each point's block (elements `s..s + len`) by its dropout mask, as sd-mecha
/// multiplies (a dropped NaN stays NaN).
fn drop_points<T: Work>(r: &Robust, p: &Prepared<T>, pts: &mut [T], s: usize, len: usize, row: usize, mask: &mut Vec<T>) {
    let Some(d) = &r.dropout else { return };
    for (i, pt) in pts.chunks_exact_mut(len.max(1)).enumerate() {
        match p.bits.get(i) {
            Some(bits) => times_bits(pt, bits, s),
            None => {
                dropout::mask(mask, pt, s, p.streams[i], d, ranks(d, row));
                pt.iter_mut().zip(mask.iter()).for_each(|(v, &m)| *v *= m);
            }
        }
    }
}

dispatch!(times_bits, times_bits_avx2, times_bits_impl, (v: &mut [T], bits: &[u64], s: usize));

/// `v[e] *= bit s + e` (1 or 0): a word at a time, the inner loop a variable shift and a
/// multiply, which vectorize.
#[inline(always)]
fn times_bits_impl<T: Work>(v: &mut [T], bits: &[u64], s: usize) {
    let mut e = 0;
    while e < v.len() {
        let j = s + e;
        let (word, off) = (bits[j / 64], j % 64);
        let take = (64 - off).min(v.len() - e);
        for (k, x) in v[e..e + take].iter_mut().enumerate() {
            *x *= T::one_if((word >> (off + k)) & 1);
        }
        e += take;
    }
}

/// Ranks drawn on the fly (tensor-wide ranks come as precomputed bits instead).
fn ranks(d: &Dropout, row: usize) -> Ranks {
    if d.rows {
        Ranks::Rows(row)
    } else {
        Ranks::None
    }
}

/// The robust term's value at each element of a block, into `sc.vals`.
fn evaluate<T: Work>(r: &Robust, p: &Prepared<T>, s: usize, len: usize, row: usize, sc: &mut Scratch<T>) {
    let Scratch {
        x,
        pts,
        count,
        vals,
        votes,
        mask,
        ..
    } = sc;
    if r.method == Method::MaskedMean {
        points(r, x, len, pts);
        // sd-mecha's `dropout`: kept values summed (a dropped NaN does not count), over the kept count.
        let d = r.dropout.as_ref().expect("checked");
        vals.clear();
        vals.resize(len, T::ZERO);
        count.clear();
        count.resize(len, T::ZERO);
        for (i, pt) in pts.chunks_exact(len.max(1)).enumerate() {
            dropout::mask(mask, pt, s, p.streams[i], d, ranks(d, row));
            for (((v, c), &y), &m) in vals.iter_mut().zip(count.iter_mut()).zip(pt).zip(mask.iter()) {
                *v += if m != T::ZERO { y } else { T::ZERO };
                *c += m;
            }
        }
        vals.iter_mut().zip(count.iter()).for_each(|(v, &c)| {
            *v /= if c > T::ONE { c } else { T::ONE };
        });
        return;
    }
    points_dropped(r, p, x, s, len, row, pts, mask);
    match r.method {
        // The agreeing points go straight into the (weighted) sum: no filtered copy.
        Method::TiesSum(ties) | Method::TiesMedian { ties, .. } => {
            ties_vote(pts, len, ties, p.thresholds.as_deref(), votes);
            let median = matches!(r.method, Method::TiesMedian { .. });
            // (every element is written: no fill)
            vals.resize(len, T::ZERO);
            if !median {
                count.resize(len, T::ZERO);
            }
            let w = if median { p.weights.as_deref() } else { None };
            T::agreeing_sum(pts, len, &votes.vote, w, (!median).then_some(&mut count[..]), vals);
            finish_sum(r, p, count, vals);
        }
        _ => {
            if let Some(ties) = r.method.ties() {
                ties_filter(pts, len, ties, p.thresholds.as_deref(), true, count, votes);
            }
            evaluate_from(r, p, len, row, pts, count, vals);
        }
    }
}

/// A TIES sum over its count, or a median's weighted sum over the weights' sum.
fn finish_sum<T: Work>(r: &Robust, p: &Prepared<T>, count: &[T], vals: &mut [T]) {
    match r.method {
        Method::TiesSum(_) => vals.iter_mut().zip(count).for_each(|(v, &c)| *v = finite_or_zero(*v / c)),
        _ => {
            let wsum = p.weights.as_deref().expect("prepared").iter().fold(T::ZERO, |a, &w| a + w);
            let clean = matches!(r.method, Method::TiesMedian { .. });
            vals.iter_mut().for_each(|v| {
                *v /= wsum;
                if clean {
                    *v = finite_or_zero(*v);
                }
            });
        }
    }
}

/// The robust term's value from a block's points (TIES-filtered, with their counts, where the
/// method is a TIES one), into `vals`.
fn evaluate_from<T: Work>(r: &Robust, p: &Prepared<T>, len: usize, row: usize, pts: &[T], count: &[T], vals: &mut Vec<T>) {
    let n = r.points.len();
    match r.method {
        Method::TiesSum(_) => {
            weighted_sum(pts, len, None, vals);
            finish_sum(r, p, count, vals);
        }
        Method::TiesStock { cos_eps, .. } => {
            let t = stock_rows(pts, n, len, row, cos_eps);
            weighted_sum(pts, len, None, vals);
            vals.iter_mut()
                .zip(count.iter())
                .enumerate()
                .for_each(|(e, (v, &c))| *v = finite_or_zero(*v * t[e / row] / c));
        }
        Method::TiesMedian { .. } | Method::GeometricMedian(_) => {
            weighted_sum(pts, len, p.weights.as_deref(), vals);
            finish_sum(r, p, count, vals);
        }
        Method::MaskedMean => unreachable!("evaluated above"),
        Method::ModelStock { cos_eps, whole } => {
            let t_rows = if whole {
                Vec::new()
            } else {
                stock_rows(pts, n, len, row, cos_eps)
            };
            weighted_sum(pts, len, None, vals);
            let nf = T::from_f64(n as f64);
            vals.iter_mut().enumerate().for_each(|(e, v)| {
                let t = if whole { p.stock.expect("prepared") } else { t_rows[e / row] };
                *v = finite_or_zero(t * (*v / nf));
            });
        }
    }
}

/// The statistics passes of one robust term. Returns what it prepared and the bytes read.
fn prepare<T: Work>(ctx: &Ctx<'_>, r: &Robust, blocks: &[(usize, usize)], numel: usize) -> Result<(Prepared<T>, u64)> {
    let mut read = 0u64;
    let streams = match &r.dropout {
        Some(d) => (0..r.points.len()).map(|i| dropout::stream(d.seed, ctx.key, i)).collect(),
        None => Vec::new(),
    };
    let mut prepared = Prepared {
        streams,
        bits: Vec::new(),
        thresholds: None,
        weights: None,
        stock: None,
    };
    if r.needs_stats() {
        read += point_stats(ctx, r, blocks, numel, &mut prepared)?;
    }
    let gram_needed = r.method.median().is_some() || matches!(r.method, Method::ModelStock { whole: true, .. });
    if !gram_needed {
        return Ok((prepared, read));
    }
    let (g, n) = gram(ctx, r, &prepared, blocks)?;
    read += n;
    let np = r.points.len();
    match r.method {
        Method::ModelStock { cos_eps, .. } => {
            prepared.stock = Some(T::from_f64(whole_stock(&g, np, cos_eps)));
        }
        _ => {
            let w = weiszfeld(&g, np, r.method.median().expect("median"));
            prepared.weights = Some(w.into_iter().map(T::from_f64).collect());
        }
    }
    Ok((prepared, read))
}

/// The statistics pass: per point, one whole tensor at a time, its DELLA rank table (from the
/// unmasked values) and its TIES trim threshold (the m-th smallest |p| of the masked values,
/// m = max(floor((1-k) numel), 1)). Points run in parallel while their tensors fit in 1 GB.
/// Returns the bytes read.
fn point_stats<T: Work>(
    ctx: &Ctx<'_>,
    r: &Robust,
    blocks: &[(usize, usize)],
    numel: usize,
    prep: &mut Prepared<T>,
) -> Result<u64> {
    let k = r.method.ties().map(|t| t.k).filter(|&k| k < 1.0);
    let table = r.dropout.filter(|d| d.needs_table());
    let one_point = |i: usize, all: &mut Vec<T>| -> Result<(Option<Vec<u64>>, T, u64)> {
        let terms = &r.points[i];
        // The point alone, its terms renumbered over the sources loaded for it: the same
        // arithmetic as `points` in the other passes, so the statistics are of the same values.
        let one = Robust {
            points: vec![terms.iter().enumerate().map(|(i, &(_, c))| (i, c)).collect()],
            method: r.method,
            dropout: None,
        };
        // (every element is written below: the buffer keeps its length, so no fill or copy)
        all.resize(numel, T::ZERO);
        // DELLA with tensor-wide ranks: the mask is drawn here, once, from the whole tensor, and
        // kept as bits (numel / 8 bytes per point) for the other passes. Each block's draws are
        // made as it is loaded, while it is in cache.
        let mut della = table.map(|d| dropout::DellaMask::new(numel, dropout::stream(d.seed, ctx.key, i), &d));
        let mut read = 0u64;
        for &(s, e) in blocks {
            read += T::with_scratch(|sc| -> Result<u64> {
                ctx.check_cancel()?;
                let n = ctx.load_some(terms.iter().map(|&(j, _)| j), s, e, sc)?;
                points_to(&one, &sc.x, e - s, &mut all[s..e]);
                Ok(n)
            })?;
            if let Some(m) = &mut della {
                m.feed(all, e);
            }
        }
        let bits = della.map(|m| m.finish(all));
        let mut thr = T::ZERO;
        if let Some(k) = k {
            match (&bits, &r.dropout) {
                (Some(b), _) => times_bits(all, b, 0),
                (None, Some(d)) => apply_mask_whole(all, blocks, dropout::stream(d.seed, ctx.key, i), d, ranks(d, ctx.row)),
                (None, None) => {}
            }
            all.iter_mut().for_each(|v| *v = v.abs());
            if !all.is_empty() {
                let m = (((1.0 - k) * numel as f64).floor() as usize).max(1);
                let (_, kth, _) = all.select_nth_unstable_by(m - 1, |a, b| a.total_cmp(b));
                thr = *kth;
            }
        }
        Ok((bits, thr, read))
    };
    // values and, for a rank table, its mask state: the keep and band bits, and 20 bytes per band
    // element (position, draw, key), a fraction |eps| of the elements (all of them from |eps| = 1)
    let per = std::mem::size_of::<T>() + if table.is_some() { 21 } else { 0 };
    let group = ((1usize << 30) / (numel.max(1) * per)).clamp(1, rayon::current_num_threads().max(1));
    let idx: Vec<usize> = (0..r.points.len()).collect();
    let mut read = 0u64;
    let (mut bits, mut thr) = (Vec::new(), Vec::new());
    // One whole-tensor buffer per concurrent point, reused by the next group: fresh pages for
    // every point cost as much as the statistics themselves.
    let mut wholes: Vec<Vec<T>> = (0..group.min(idx.len())).map(|_| Vec::with_capacity(numel)).collect();
    for g in idx.chunks(group) {
        let done: Vec<_> = g
            .par_iter()
            .zip(wholes.par_iter_mut())
            .with_max_len(1)
            .map(|(&i, all)| one_point(i, all))
            .collect::<Result<_>>()?;
        for (b, h, n) in done {
            bits.push(b);
            thr.push(h);
            read += n;
        }
    }
    if table.is_some() {
        prep.bits = bits.into_iter().map(|b| b.unwrap_or_default()).collect();
    }
    if k.is_some() {
        prep.thresholds = Some(thr);
    }
    Ok(read)
}

/// Masks a whole point tensor block by block (rows-mode ranks need the block's whole rows).
fn apply_mask_whole<T: Work>(all: &mut [T], blocks: &[(usize, usize)], key: [u32; 3], d: &Dropout, ranks: Ranks) {
    let mut m = Vec::new();
    for &(s, e) in blocks {
        let v = &mut all[s..e];
        dropout::mask(&mut m, v, s, key, d, ranks);
        v.iter_mut().zip(&m).for_each(|(x, &k)| *x *= k);
    }
}

/// The Gram matrix of the points (TIES-filtered when the method says so), summed in f64 over
/// blocks in block order; each block's partial is one matrix product ([`Real::gram`], in f64).
fn gram<T: Work>(ctx: &Ctx<'_>, r: &Robust, prep: &Prepared<T>, blocks: &[(usize, usize)]) -> Result<(Vec<f64>, u64)> {
    let np = r.points.len();
    let mut g = vec![0f64; np * np];
    let mut read = 0u64;
    // Blocks run in parallel a group at a time and their partials are added in block order: the
    // same sum as one long sequence, with at most a group of N x N partials held (all of them
    // at once grew as numel x N^3 / 65536 bytes: 0.5 GB for one SDXL/4 tensor at N = 64).
    let group = (4 * rayon::current_num_threads()).max(1);
    for chunk in blocks.chunks(group) {
        let partials: Vec<(Vec<f64>, u64)> = chunk
            .par_iter()
            .map(|&(s, e)| -> Result<(Vec<f64>, u64)> {
                T::with_scratch(|sc| {
                    ctx.check_cancel()?;
                    let n = ctx.load(s, e, sc)?;
                    let len = e - s;
                    let Scratch {
                        x,
                        pts,
                        count,
                        votes,
                        mask,
                        ..
                    } = sc;
                    points_dropped(r, prep, x, s, len, ctx.row, pts, mask);
                    if let Some(t) = r.method.ties() {
                        ties_filter(pts, len, t, prep.thresholds.as_deref(), false, count, votes);
                    }
                    // (Up to 8 points an AVX-512 FMA kernel; beyond, the GEMM: a portable
                    // hand-tiled kernel had measured slower there, 27 s vs 16 s at N=64, SDXL/8.)
                    Ok((T::gram(pts, np, len), n))
                })
            })
            .collect::<Result<_>>()?;
        for (p, n) in partials {
            g.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            read += n;
        }
    }
    Ok((g, read))
}

/// The whole-tensor model stock factor (mergekit: the mean cosine over all pairs) from the Gram
/// matrix of the `np` points.
pub fn whole_stock(g: &[f64], np: usize, cos_eps: f64) -> f64 {
    let norm = |i: usize| g[i * np + i].max(0.0).sqrt().max(cos_eps);
    let mut c = 0.0;
    let mut pairs = 0usize;
    for i in 0..np {
        for j in i + 1..np {
            c += g[i * np + j] / (norm(i) * norm(j));
            pairs += 1;
        }
    }
    if pairs == 0 {
        1.0
    } else {
        stock_factor(np, c / pairs as f64)
    }
}

/// Weiszfeld on the Gram matrix: the median is `m = sum c_i x_i`, so
/// `|x_i - m|^2 = G_ii - 2 (G c)_i + c^T G c`. Returns the last iteration's (unnormalised)
/// weights, as sd-mecha returns `weighted_average(points, new_weights)`.
pub fn weiszfeld(g: &[f64], n: usize, m: Median) -> Vec<f64> {
    let uniform = vec![1.0; n];
    if g.iter().any(|v| !v.is_finite()) {
        return uniform;
    }
    let dists = |w: &[f64]| -> Vec<f64> {
        let s: f64 = w.iter().sum();
        let c: Vec<f64> = w.iter().map(|x| x / s).collect();
        let gc: Vec<f64> = (0..n).map(|i| (0..n).map(|j| g[i * n + j] * c[j]).sum()).collect();
        let cgc: f64 = c.iter().zip(&gc).map(|(a, b)| a * b).sum();
        (0..n).map(|i| (g[i * n + i] - 2.0 * gc[i] + cgc).max(0.0).sqrt()).collect()
    };
    let objective = |d: &[f64]| d.iter().sum::<f64>() / n as f64;
    let mut w = uniform;
    let mut d = dists(&w);
    let mut f = objective(&d);
    for _ in 0..m.maxiter {
        let prev = f;
        w = d.iter().map(|&di| 1.0 / di.max(m.eps)).collect();
        d = dists(&w);
        f = objective(&d);
        if (prev - f).abs() <= m.ftol * f {
            break;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn med() -> Median {
        Median {
            eps: 1e-6,
            maxiter: 100,
            ftol: 1e-20,
        }
    }

    #[test]
    fn weiszfeld_matches_direct_iteration() {
        // Points on a line 0, 1, 10: the median is the middle point.
        let xs = [0.0f64, 1.0, 10.0];
        let g: Vec<f64> = (0..9).map(|k| xs[k / 3] * xs[k % 3]).collect();
        let w = weiszfeld(&g, 3, med());
        let m: f64 = xs.iter().zip(&w).map(|(x, w)| x * w).sum::<f64>() / w.iter().sum::<f64>();
        assert!((m - 1.0).abs() < 1e-5, "{m}");
    }

    #[test]
    fn weiszfeld_zero_iterations_is_the_mean_and_nan_falls_back() {
        let g = vec![1.0, 0.0, 0.0, 4.0];
        assert_eq!(weiszfeld(&g, 2, Median { maxiter: 0, ..med() }), vec![1.0, 1.0]);
        assert_eq!(weiszfeld(&[f64::NAN, 0.0, 0.0, 1.0], 2, med()), vec![1.0, 1.0]);
    }

    /// The one-pass sum has the bits of the point-after-point one, in both precisions, with and
    /// without weights and counts, signed zeros, NaNs and a ragged tail.
    #[test]
    fn agreeing_sum_has_the_bits_of_point_after_point() {
        fn check<T: Work>() {
            let (np, len) = (5, 23);
            let special = [0.0, -0.0, f64::NAN, 1e-300, -3.5];
            let pts: Vec<T> = (0..np * len)
                .map(|i| {
                    T::from_f64(if i % 7 == 0 {
                        special[i % 5]
                    } else {
                        ((i * 7919) % 97) as f64 / 13.0 - 3.7
                    })
                })
                .collect();
            let s: Vec<T> = (0..len).map(|e| T::from_f64([1.0, -1.0, 0.0][e % 3])).collect();
            let w: Vec<T> = (0..np).map(|i| T::from_f64(0.3 + i as f64 / 7.0)).collect();
            for weights in [None, Some(&w[..])] {
                let (mut want, mut want_c) = (vec![T::ZERO; len], vec![T::ZERO; len]);
                for (i, pt) in pts.chunks_exact(len).enumerate() {
                    let mut kept = pt.to_vec();
                    keep_agreeing_portable(&mut kept, &s, Some(&mut want_c));
                    let wi = weights.map_or(T::ONE, |w| w[i]);
                    want.iter_mut().zip(&kept).for_each(|(v, &k)| *v += k * wi);
                }
                let (mut got, mut got_c) = (vec![T::ONE; len], vec![T::ONE; len]);
                T::agreeing_sum(&pts, len, &s, weights, Some(&mut got_c), &mut got);
                let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want));
                assert_eq!(bits(&got_c), bits(&want_c));
            }
        }
        check::<f64>();
        check::<f32>();
    }

    #[test]
    fn ties_filter_elects_by_count_or_mass() {
        // Three points of two elements, point-major.
        let x = [1.0, 0.0, 2.0, 0.0, -5.0, 3.0];
        let count_rule = Ties {
            k: 1.0,
            vote_mass: false,
        };
        let (mut c, mut v) = (Vec::new(), Votes::default());
        let mut y = x;
        ties_filter(&mut y, 2, count_rule, None, true, &mut c, &mut v);
        assert_eq!((y[0], y[2], y[4], c[0]), (1.0, 2.0, 0.0, 2.0));
        // element 1: signs 0, 0, + -> elected +, only the third agrees
        assert_eq!((y[5], c[1]), (3.0, 1.0));
        let mut y = x;
        ties_filter(&mut y, 2, Ties { k: 1.0, vote_mass: true }, None, true, &mut c, &mut v);
        assert_eq!((y[0], y[4], c[0]), (0.0, -5.0, 1.0));
        // Trimmed below 1.5 first: [0, 2, -5] ties the vote (sign 0): only the trimmed zero agrees.
        let mut y = x;
        ties_filter(&mut y, 2, count_rule, Some(&[1.5, 1.5, 1.5]), true, &mut c, &mut v);
        assert_eq!((y[0], y[2], y[4], c[0]), (0.0, 0.0, 0.0, 1.0));
        // A NaN point: the element agrees with nothing.
        let mut y = [f64::NAN, 1.0, 2.0, 1.0, 3.0, 1.0];
        ties_filter(&mut y, 2, count_rule, None, true, &mut c, &mut v);
        assert_eq!((y[0], y[2], y[4], c[0], c[1]), (0.0, 0.0, 0.0, 0.0, 3.0));
    }

    #[test]
    fn stock_factor_degenerate_rows_are_zero() {
        assert_eq!(stock_factor(2, -1.0), 0.0);
        assert!((stock_factor(3, 0.5) - 1.5 / 2.0).abs() < 1e-15);
        assert!(stock_factor(2, -1.0 + 3e-7).abs() > 1e6);
    }

    #[test]
    fn error_bad_parameters() {
        assert!(Method::TiesSum(Ties {
            k: 0.0,
            vote_mass: false
        })
        .check()
        .is_err());
        assert!(Method::GeometricMedian(Median { eps: 0.0, ..med() }).check().is_err());
        assert!(Method::ModelStock {
            cos_eps: -1.0,
            whole: false
        }
        .check()
        .is_err());
        let e = Expr {
            linear: vec![(3, 1.0)],
            ..Default::default()
        };
        assert!(e.check(2).is_err());
    }
}
