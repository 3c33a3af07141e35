//! DARE / DELLA dropout masks that depend on nothing but (seed, key, model, element): the same
//! mask whatever the thread count, block size or executor.
//!
//! - Each (seed, key name, model index) gets a stream key: the first 12 bytes of a SHA-256 of
//!   them. Element `j` of that stream draws `u = h(key, j) / 2^32` with `h` three rounds of the
//!   `lowbias32` integer hash (a counter-based generator: no state, so any block can be drawn
//!   alone), and is kept when `u < q`.
//! - `q = clamp(1 - p + e, 0, 1)`; `e = 0` for DARE; for DELLA `e = (r/n - (n+1)/(2n)) * eps`
//!   with `r` the ordinal rank (1..n, ties by position) of `|d|` within the whole tensor of that
//!   model (sd-mecha) or within its row (`rows`, the DELLA paper's and mergekit's choice).
//! - A tensor-wide rank needs the whole tensor of one model: [`RankTable`] is built from it in a
//!   statistics pass (one tensor of one model at a time) and then answers any element's rank to
//!   within `TOL / |eps|` of n, so `q` is within `TOL` of the exact formula.
//! - sd-mecha multiplies the delta by the mask, so a dropped NaN stays NaN (and a dropped
//!   negative value becomes -0.0); we do the same. A model whose tensor holds a NaN gets `e = 0`
//!   everywhere (sd-mecha's ranks are then all NaN, which it sets to 0).

use sha2::{Digest, Sha256};

use crate::real::Real;

/// The generator's name and version, recorded in the output's metadata.
pub const GENERATOR: &str = "astolfomix-mask-v1: stream = sha256(seed, key, model)[0:12]; u = lowbias32^3(element) / 2^32";

/// Largest error allowed in a DELLA keep probability (absolute): ranks are estimated to within
/// `TOL / |eps|` of n.
pub const TOL: f64 = 1e-4;

/// Dropout applied to every point of a robust node before its method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability.
    pub p: f64,
    /// DELLA's rank weight (0: plain DARE).
    pub della_eps: f64,
    /// Rank within rows of the last dimension instead of the whole tensor.
    pub rows: bool,
    /// Seed of every stream.
    pub seed: u64,
}

impl Dropout {
    /// Checks the parameters.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(format!("probability must be in [0, 1), not {}", self.p));
        }
        if !self.della_eps.is_finite() || self.della_eps.abs() > 100.0 {
            return Err(format!("della_eps must be a number in [-100, 100], not {}", self.della_eps));
        }
        Ok(())
    }

    /// Whether keep probabilities depend on a tensor-wide rank (a statistics pass).
    pub fn needs_table(&self) -> bool {
        self.della_eps != 0.0 && !self.rows
    }

    fn q(&self, rank: f64, n: f64) -> f64 {
        let e = (rank / n - (n + 1.0) / (2.0 * n)) * self.della_eps;
        let e = if e.is_finite() { e } else { 0.0 };
        (1.0 - self.p + e).clamp(0.0, 1.0)
    }
}

/// The stream key of one model at one key.
pub fn stream(seed: u64, key: &str, model: usize) -> [u32; 3] {
    let mut h = Sha256::new();
    h.update(b"astolfomix-mask-v1\0");
    h.update(seed.to_le_bytes());
    h.update((key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update((model as u64).to_le_bytes());
    let d = h.finalize();
    let w = |i: usize| u32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]);
    [w(0), w(1), w(2)]
}

#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    // Chris Wellons' lowbias32: a bijection on u32 with low avalanche bias.
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

const TWO32: f64 = 4_294_967_296.0;

/// The uniform 32-bit draw of element `lo + e` (low counter word `lo`, high word folded into `k1`):
/// `lowbias32(lowbias32(lowbias32(lo(j) ^ k0) ^ hi(j) ^ k1) ^ k2)`.
#[inline(always)]
fn draw(key: [u32; 3], k1: u32, lo: u32, e: u32) -> u32 {
    let x = lowbias32(lo.wrapping_add(e) ^ key[0]);
    let x = lowbias32(x ^ k1);
    lowbias32(x ^ key[2])
}

/// `out[e]` = the draw of element `j = start + e` in stream `key` (see [`draw`]). Computed over
/// runs of equal high counter word with a 32-bit counter, so the loop vectorizes (AVX2 where
/// present).
fn draws(out: &mut [u32], key: [u32; 3], start: u64) {
    #[inline(always)]
    fn run(out: &mut [u32], key: [u32; 3], lo: u32, hi: u32) {
        let k1 = hi ^ key[1];
        for (e, m) in out.iter_mut().enumerate() {
            *m = draw(key, k1, lo, e as u32);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(out: &mut [u32], key: [u32; 3], lo: u32, hi: u32) {
        run(out, key, lo, hi)
    }
    let mut done = 0usize;
    while done < out.len() {
        let idx = start + done as u64;
        // elements until the low counter word wraps
        let left = ((1u64 << 32) - (idx & 0xffff_ffff)).min((out.len() - done) as u64) as usize;
        let part = &mut out[done..done + left];
        let (lo, hi) = (idx as u32, (idx >> 32) as u32);
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::Level::detect().has_avx2() {
            // SAFETY: the level is AVX2 or above only where the CPU has AVX2.
            unsafe { run_avx2(part, key, lo, hi) };
            done += left;
            continue;
        }
        run(part, key, lo, hi);
        done += left;
    }
}

thread_local! {
    /// Per thread: the draws of [`mask`], kept between calls.
    static DRAWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a point's ranks are known.
#[derive(Clone, Copy)]
pub enum Ranks<'a> {
    /// No rank term (DARE, or a model whose tensor holds a NaN).
    None,
    /// Tensor-wide ranks from a table.
    Table(&'a RankTable),
    /// Ranks within rows of this length (the block holds whole rows).
    Rows(usize),
}

/// `ceil(x)` for `x` in `[0, 2^32]`: for an integer draw `u`, `u < x` exactly when `u < ceil(x)`,
/// so integer thresholds give the same decisions as the f64 comparison.
fn ceil_u64(x: f64) -> u64 {
    x.ceil() as u64
}

/// The rank-dependent part of DELLA's decision with a tensor-wide table: draws below `lo` are
/// kept whatever the rank, draws at or above `hi` dropped; only the band between needs a rank.
struct Band<'a> {
    d: &'a Dropout,
    t: &'a RankTable,
    lo: u64,
    hi: u64,
    n: f64,
}

impl<'a> Band<'a> {
    fn new(d: &'a Dropout, t: &'a RankTable) -> Band<'a> {
        let half = d.della_eps.abs() / 2.0;
        Band {
            d,
            t,
            lo: ceil_u64((1.0 - d.p - half).clamp(0.0, 1.0) * TWO32),
            hi: ceil_u64((1.0 - d.p + half).clamp(0.0, 1.0) * TWO32),
            n: t.n as f64,
        }
    }

    /// Whether element `j` (value `v`, draw `u`) inside the band is kept.
    #[inline]
    fn keep_in_band<T: Real>(&self, u: u32, v: T, j: u64) -> bool {
        (u as f64) < self.d.q(self.t.rank(v, j), self.n) * TWO32
    }
}

/// The keep mask (1 / 0) of one point's elements `start..start + vals.len()` into `out`.
pub fn mask<T: Real>(out: &mut Vec<T>, vals: &[T], start: usize, key: [u32; 3], d: &Dropout, ranks: Ranks<'_>) {
    out.clear();
    out.resize(vals.len(), T::ZERO);
    let one = |keep: bool| if keep { T::ONE } else { T::ZERO };
    let q0 = ceil_u64((1.0 - d.p).clamp(0.0, 1.0) * TWO32);
    let ranks = match ranks {
        _ if d.della_eps == 0.0 => Ranks::None,
        Ranks::Table(t) if t.nan => Ranks::None,
        r => r,
    };
    let mut u = DRAWS.with(|u| std::mem::take(&mut *u.borrow_mut()));
    u.clear();
    u.resize(vals.len(), 0);
    draws(&mut u, key, start as u64);
    match ranks {
        Ranks::None => out.iter_mut().zip(&u).for_each(|(m, &x)| *m = one((x as u64) < q0)),
        Ranks::Table(t) => {
            let band = Band::new(d, t);
            for (e, ((m, &v), &x)) in out.iter_mut().zip(vals).zip(&u).enumerate() {
                let x64 = x as u64;
                *m = one(x64 < band.lo || (x64 < band.hi && band.keep_in_band(x, v, (start + e) as u64)));
            }
        }
        Ranks::Rows(row) => {
            let row = row.max(1);
            let mut order: Vec<(u64, u32)> = Vec::with_capacity(row);
            let mut rank = vec![0f64; row];
            for ((ms, vs), us) in out.chunks_mut(row).zip(vals.chunks(row)).zip(u.chunks(row)) {
                let nan = vs.iter().any(|v| v.is_nan());
                if !nan {
                    order.clear();
                    order.extend(vs.iter().enumerate().map(|(i, v)| (v.rank_key(), i as u32)));
                    order.sort_unstable();
                    for (pos, &(_, i)) in order.iter().enumerate() {
                        rank[i as usize] = (pos + 1) as f64;
                    }
                }
                let n = vs.len() as f64;
                for (i, (m, &x)) in ms.iter_mut().zip(us).enumerate() {
                    let q = if nan { (1.0 - d.p).clamp(0.0, 1.0) } else { d.q(rank[i], n) };
                    *m = one((x as f64) < q * TWO32);
                }
            }
        }
    }
    DRAWS.with(|d| *d.borrow_mut() = u);
}

/// A whole tensor's mask with tensor-wide ranks, as bits (bit `j % 64` of word `j / 64` is
/// element `j`): the same decisions as [`mask`] with `Ranks::Table`, but drawn as integers, 64 at
/// a time, with a rank looked up only for draws inside the band.
pub fn table_bits<T: Real>(vals: &[T], key: [u32; 3], d: &Dropout, t: &RankTable) -> Vec<u64> {
    const STEP: usize = 4096; // a multiple of 64: words never straddle steps
    let mut bits = vec![0u64; vals.len().div_ceil(64)];
    let plain = d.della_eps == 0.0 || t.nan;
    let band = Band::new(d, t);
    let (lo, hi) = if plain {
        let q0 = ceil_u64((1.0 - d.p).clamp(0.0, 1.0) * TWO32);
        (q0, q0)
    } else {
        (band.lo, band.hi)
    };
    let mut u = vec![0u32; STEP];
    for (c, part) in vals.chunks(STEP).enumerate() {
        let start = c * STEP;
        let u = &mut u[..part.len()];
        draws(u, key, start as u64);
        for (w, us) in u.chunks(64).enumerate() {
            let below_lo = below(us, lo);
            let (mut keep, mut inside) = (below_lo, below(us, hi) & !below_lo);
            while inside != 0 {
                let i = inside.trailing_zeros() as usize;
                inside &= inside - 1;
                let j = start + w * 64 + i;
                if band.keep_in_band(us[i], vals[j], j as u64) {
                    keep |= 1 << i;
                }
            }
            bits[start / 64 + w] = keep;
        }
    }
    bits
}

/// Bit `i` set where `us[i] < t` (at most 64 draws; `t` up to 2^32).
fn below(us: &[u32], t: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if us.len() == 64 && crate::kernels::Level::detect().has_avx2() {
        // SAFETY: AVX2 was detected on this CPU; `us` holds 64 draws.
        return unsafe { below_avx2(us, t) };
    }
    us.iter()
        .enumerate()
        .fold(0u64, |acc, (i, &x)| acc | (((x as u64) < t) as u64) << i)
}

/// [`below`] 8 draws at a time: an unsigned compare as a signed one of the biased values, and
/// each lane's sign bit gathered by `movemask`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn below_avx2(us: &[u32], t: u64) -> u64 {
    use std::arch::x86_64::*;
    if t > u32::MAX as u64 {
        return u64::MAX;
    }
    let bias = _mm256_set1_epi32(i32::MIN);
    let tv = _mm256_set1_epi32((t as u32 ^ 0x8000_0000) as i32);
    let mut out = 0u64;
    for g in 0..8 {
        // SAFETY: `us` holds 64 draws, so lanes g * 8 .. g * 8 + 8 are in it.
        let x = unsafe { _mm256_loadu_si256(us.as_ptr().add(g * 8) as *const __m256i) };
        let lt = _mm256_cmpgt_epi32(tv, _mm256_xor_si256(x, bias));
        out |= (_mm256_movemask_ps(_mm256_castsi256_ps(lt)) as u32 as u64) << (g * 8);
    }
    out
}

/// Buckets of the first level of a [`RankTable`] at most (its per-bucket state stays in the L2 cache).
const BUCKETS: usize = 1 << 16;
/// Bits a finer level splits a heavy bucket by.
const SUB_BITS: u32 = 8;
const LIGHT: u32 = u32::MAX;
const SINGLE: u32 = 1 << 31;

/// Approximate ordinal ranks of `(|v_j|, j)` within one tensor of one model, built from the
/// whole tensor and then queried element by element.
///
/// Keys are the bits of `|v|` (monotone for non-negative floats). A first counting pass buckets
/// them by their top bits (zero alone in bucket 0, at most 65536 buckets over the non-zero
/// range). A bucket of at most `T` elements is answered by its midpoint. A second counting pass
/// splits every heavier bucket by the next 8 bits and notes, per sub-bucket, whether it holds
/// more than one key and the positions of its elements 0, T, 2T, ...: a heavy sub-bucket of one
/// key (fp16 deltas repeat values: the common case) is answered from those positions (ties rank
/// by position, so a binary search places an element). A heavy sub-bucket of several keys (rare)
/// has its (key, position) pairs gathered and split further, level by level, until every part is
/// light or holds one key. No sort. Errors are at most `T / 2` ranks with `T <= 1.8e-4 n / |eps|`
/// (a power of two), so the keep probability is within 0.9e-4 of the exact one.
#[derive(Debug, Clone)]
pub struct RankTable {
    n: u64,
    nan: bool,
    q: u64,
    nodes: Vec<Node>,
    /// Sampled positions of every single-key part, part after part; `spans[i]` is part i's range.
    samples: Vec<u64>,
    spans: Vec<(usize, usize)>,
}

#[derive(Debug, Clone)]
struct Node {
    shift: u32,
    base: u64,
    /// The root keeps zero in bucket 0 of its own.
    root: bool,
    /// Elements below each bucket within this node (one more entry than buckets).
    below: Vec<u64>,
    /// Per bucket: [`LIGHT`], a child node index, or `SINGLE | index` into `spans`.
    kind: Vec<u32>,
}

impl Node {
    #[inline(always)]
    fn bucket(&self, k: u64) -> usize {
        let last = self.kind.len() - 1;
        if self.root {
            if k == 0 {
                0
            } else {
                (((k >> self.shift).saturating_sub(self.base) + 1) as usize).min(last)
            }
        } else {
            ((k >> self.shift).saturating_sub(self.base) as usize).min(last)
        }
    }

    fn prefix(count: impl Iterator<Item = u64>) -> Vec<u64> {
        let mut below = vec![0u64];
        for c in count {
            below.push(below.last().expect("non-empty") + c);
        }
        below
    }
}

impl RankTable {
    /// The table of one tensor's values (one model's points), for a DELLA weight `della_eps`.
    pub fn build<T: Real>(vals: &[T], della_eps: f64) -> RankTable {
        let n = vals.len();
        let q = ((1.8 * TOL * n as f64 / della_eps.abs().max(1e-300)).floor() as u64).max(1);
        // A power of two: the sampling test is a mask.
        let q = 1u64 << (63 - q.leading_zeros());
        let mut t = RankTable {
            n: n as u64,
            nan: false,
            q,
            nodes: Vec::new(),
            samples: Vec::new(),
            spans: Vec::new(),
        };
        let key = |v: T| v.rank_key();
        // Zero (common: untouched weights) gets a bucket of its own, so the others span only the
        // range of the non-zero magnitudes.
        let (mut kmin, mut kmax, mut nan) = (u64::MAX, 0u64, false);
        for &v in vals {
            let k = key(v);
            nan |= v.is_nan();
            kmin = if k == 0 { kmin } else { kmin.min(k) };
            kmax = kmax.max(k);
        }
        if nan || n == 0 {
            t.nan = nan;
            t.nodes.push(Node {
                shift: 0,
                base: 0,
                root: true,
                below: vec![0, n as u64],
                kind: vec![LIGHT],
            });
            return t;
        }
        // (all zeros: an empty non-zero range, one unused bucket)
        let kmax = kmax.max(1);
        let kmin = kmin.min(kmax);
        let cap = n.clamp(256, BUCKETS) as u64;
        let mut shift = 0;
        while (kmax >> shift) - (kmin >> shift) >= cap {
            shift += 1;
        }
        let nb = ((kmax >> shift) - (kmin >> shift) + 2) as usize;
        let mut root = Node {
            shift,
            base: kmin >> shift,
            root: true,
            below: Vec::new(),
            kind: vec![LIGHT; nb],
        };
        // Pass 1: counts per bucket.
        let mut count = vec![0u32; nb];
        for &v in vals {
            count[root.bucket(key(v))] += 1;
        }
        root.below = Node::prefix(count.iter().map(|&c| c as u64));
        let heavy: Vec<usize> = (0..nb).filter(|&b| count[b] as u64 > q).collect();
        t.nodes.push(root);
        if heavy.is_empty() {
            return t;
        }
        // Pass 2: each heavy bucket split by the next bits (at most 8) into sub-buckets, each with
        // its count, whether it holds more than one key, and the positions of its elements 0, q,
        // 2q, ... (all a single-key sub-bucket needs). Light buckets' elements count into a
        // spare range, so the loop has no branch on them.
        let sub_bits = shift.min(SUB_BITS);
        let (shift2, nsub) = (shift - sub_bits, 1usize << sub_bits);
        let spare = (heavy.len() * nsub) as u32;
        let mut off = vec![spare; nb];
        for (h, &b) in heavy.iter().enumerate() {
            off[b] = (h * nsub) as u32;
        }
        let total = (heavy.len() + 1) * nsub;
        let (mut cnt, mut first, mut mixed) = (vec![0u32; total], vec![0u64; total], vec![0u8; total]);
        let mut picks: Vec<(u32, u64)> = Vec::with_capacity(heavy.len() * nsub + n / q as usize + 1);
        let (root, sub_mask, qm) = (&t.nodes[0], (nsub - 1) as u64, (q - 1) as u32);
        for (j, &v) in vals.iter().enumerate() {
            let k = key(v);
            let i = off[root.bucket(k)] as usize + ((k >> shift2) & sub_mask) as usize;
            let c = cnt[i];
            cnt[i] = c.wrapping_add(1);
            if c & qm == 0 {
                // (rare: the branch predicts well, and `first` is written once per sub-bucket)
                if c == 0 {
                    first[i] = k;
                }
                picks.push((i as u32, j as u64));
            }
            mixed[i] |= (k != first[i]) as u8;
        }
        // The level-2 nodes; single-key heavy sub-buckets get their picks as samples.
        let mut span_of = vec![u32::MAX; heavy.len() * nsub];
        let mut split = Vec::new();
        for (h, &b) in heavy.iter().enumerate() {
            let r = h * nsub..(h + 1) * nsub;
            // bucket 0 of the root holds zero alone: its keys' next bits are 0 too
            let lo_key = if b == 0 {
                0
            } else {
                (t.nodes[0].base + b as u64 - 1) << t.nodes[0].shift
            };
            let mut node = Node {
                shift: shift2,
                base: lo_key >> shift2,
                root: false,
                below: Node::prefix(cnt[r.clone()].iter().map(|&c| c as u64)),
                kind: vec![LIGHT; nsub],
            };
            for (c, i) in r.enumerate() {
                if cnt[i] as u64 <= q {
                    continue;
                }
                if mixed[i] != 0 {
                    split.push((t.nodes.len(), c, h * nsub + c));
                } else {
                    span_of[h * nsub + c] = t.spans.len() as u32;
                    node.kind[c] = SINGLE | t.spans.len() as u32;
                    t.spans.push((0, 0));
                }
            }
            t.nodes[0].kind[b] = t.nodes.len() as u32;
            t.nodes.push(node);
        }
        let mut len = vec![0usize; t.spans.len() + 1];
        for &(i, _) in &picks {
            if let Some(&s) = span_of.get(i as usize).filter(|&&s| s != u32::MAX) {
                len[s as usize + 1] += 1;
            }
        }
        for i in 0..t.spans.len() {
            len[i + 1] += len[i];
            t.spans[i] = (len[i], len[i + 1]);
        }
        t.samples = vec![0; len[t.spans.len()]];
        let mut fill: Vec<usize> = len[..t.spans.len()].to_vec();
        for &(i, j) in &picks {
            if let Some(&s) = span_of.get(i as usize).filter(|&&s| s != u32::MAX) {
                t.samples[fill[s as usize]] = j;
                fill[s as usize] += 1;
            }
        }
        drop(picks);
        // Heavy sub-buckets of several keys (rare): their (key, position) pairs, split further.
        if !split.is_empty() {
            let mut at = vec![u32::MAX; (heavy.len() + 1) * nsub];
            for (p, &(_, _, i)) in split.iter().enumerate() {
                at[i] = p as u32;
            }
            let mut parts: Vec<Vec<(u64, u64)>> = split.iter().map(|&(_, _, i)| Vec::with_capacity(cnt[i] as usize)).collect();
            let root = &t.nodes[0];
            for (j, &v) in vals.iter().enumerate() {
                let k = key(v);
                let p = at[off[root.bucket(k)] as usize + ((k >> shift2) & sub_mask) as usize];
                if p != u32::MAX {
                    parts[p as usize].push((k, j as u64));
                }
            }
            for (&(node, c, _), mut part) in split.iter().zip(parts) {
                t.split(node, c, &mut part);
            }
        }
        t
    }

    /// Splits bucket `b` of node `i` (heavy, several keys; `part` its (key, position) pairs in
    /// position order) into a child node by the next bits, recursively.
    fn split(&mut self, i: usize, b: usize, part: &mut [(u64, u64)]) {
        let (lo, hi) = part.iter().fold((u64::MAX, 0), |(lo, hi), &(k, _)| (lo.min(k), hi.max(k)));
        if lo == hi || self.nodes[i].shift == 0 {
            // One key: ranks within are positions, already in order.
            self.nodes[i].kind[b] = SINGLE | self.spans.len() as u32;
            let from = self.samples.len();
            self.samples.extend(part.iter().map(|&(_, j)| j).step_by(self.q as usize));
            self.spans.push((from, self.samples.len()));
            return;
        }
        let shift = self.nodes[i].shift.saturating_sub(SUB_BITS);
        let node = Node {
            shift,
            base: lo >> shift,
            root: false,
            below: Vec::new(),
            kind: vec![LIGHT; ((hi >> shift) - (lo >> shift) + 1) as usize],
        };
        let nb = node.kind.len();
        let mut sub = vec![0u64; nb];
        for &(k, _) in part.iter() {
            sub[node.bucket(k)] += 1;
        }
        // Stable counting sort of the part by sub-bucket: positions stay in order within each.
        let below = Node::prefix(sub.iter().copied());
        let mut sorted = vec![(0u64, 0u64); part.len()];
        let mut fill: Vec<usize> = below[..nb].iter().map(|&x| x as usize).collect();
        for &(k, j) in part.iter() {
            let c = node.bucket(k);
            sorted[fill[c]] = (k, j);
            fill[c] += 1;
        }
        part.copy_from_slice(&sorted);
        drop(sorted);
        let child = self.nodes.len();
        self.nodes.push(Node {
            below: below.clone(),
            ..node
        });
        self.nodes[i].kind[b] = child as u32;
        for c in 0..nb {
            if sub[c] > self.q {
                self.split(child, c, &mut part[below[c] as usize..below[c + 1] as usize]);
            }
        }
    }

    /// Whether the tensor held a NaN (then every rank term is 0).
    pub fn has_nan(&self) -> bool {
        self.nan
    }

    /// The estimated ordinal rank (1..n) of element `j`, whose value is `v`.
    pub fn rank<T: Real>(&self, v: T, j: u64) -> f64 {
        let k = v.rank_key();
        let mut node = &self.nodes[0];
        let mut r = 0.0;
        loop {
            let b = node.bucket(k);
            r += node.below[b] as f64;
            let count = node.below[b + 1] - node.below[b];
            match node.kind[b] {
                LIGHT => return r + count.saturating_sub(1) as f64 / 2.0 + 1.0,
                s if s & SINGLE != 0 => {
                    // m samples before j: its place among the part is in ((m-1)q, mq].
                    let (from, to) = self.spans[(s & !SINGLE) as usize];
                    let m = self.samples[from..to].partition_point(|&x| x < j) as u64;
                    let within = if m == 0 {
                        0.0
                    } else {
                        (((m - 1) * self.q) as f64 + (self.q + 1) as f64 / 2.0).min(count.saturating_sub(1) as f64)
                    };
                    return r + within + 1.0;
                }
                c => node = &self.nodes[c as usize],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact ordinal ranks, ties by position.
    fn exact(vals: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..vals.len()).collect();
        idx.sort_by(|&a, &b| vals[a].abs().total_cmp(&vals[b].abs()).then(a.cmp(&b)));
        let mut r = vec![0.0; vals.len()];
        for (pos, &i) in idx.iter().enumerate() {
            r[i] = (pos + 1) as f64;
        }
        r
    }

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 1e-3
            })
            .collect()
    }

    fn max_err(vals: &[f64], eps: f64) -> f64 {
        let t = RankTable::build(vals, eps);
        let ex = exact(vals);
        let n = vals.len() as f64;
        vals.iter()
            .enumerate()
            .map(|(j, &v)| (t.rank(v, j as u64) - ex[j]).abs() / n * eps.abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn ranks_within_tolerance_continuous_repeated_and_zero() {
        let cont = lcg(200_000, 1);
        assert!(max_err(&cont, 0.1) <= TOL, "{}", max_err(&cont, 0.1));
        assert!(max_err(&cont, 1.0) <= TOL);
        // Repeated values (fp16-like quantisation) and zeros spread unevenly by position.
        let quant: Vec<f64> = cont
            .iter()
            .enumerate()
            .map(|(i, v)| if i < 50_000 { 0.0 } else { (v * 1e4).round() / 1e4 })
            .collect();
        assert!(max_err(&quant, 0.1) <= TOL, "{}", max_err(&quant, 0.1));
        assert!(max_err(&quant, 3.0) <= TOL, "{}", max_err(&quant, 3.0));
        // All equal: the rank is the position.
        let zeros = vec![0.0; 10_000];
        assert!(max_err(&zeros, 0.5) <= TOL);
        // Small tensors are exact.
        let small = lcg(100, 2);
        assert_eq!(max_err(&small, 0.1), 0.0);
    }

    #[test]
    fn nan_tensor_has_no_rank_term() {
        let t = RankTable::build(&[1.0, f64::NAN, 2.0], 0.1);
        assert!(t.has_nan());
        let d = Dropout {
            p: 0.5,
            della_eps: 0.1,
            rows: false,
            seed: 3,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let vals = [1.0, f64::NAN, 2.0];
        mask(&mut a, &vals, 0, stream(3, "k", 0), &d, Ranks::Table(&t));
        mask(
            &mut b,
            &vals,
            0,
            stream(3, "k", 0),
            &Dropout { della_eps: 0.0, ..d },
            Ranks::None,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn masks_do_not_depend_on_block_boundaries() {
        let d = Dropout {
            p: 0.3,
            della_eps: -0.2,
            rows: false,
            seed: 7,
        };
        let vals = lcg(5000, 9);
        let t = RankTable::build(&vals, d.della_eps);
        let k = stream(d.seed, "model.diffusion_model.x.weight", 4);
        let mut whole = Vec::new();
        mask(&mut whole, &vals, 0, k, &d, Ranks::Table(&t));
        let mut parts = Vec::new();
        for s in (0..5000).step_by(777) {
            let e = (s + 777).min(5000);
            let mut m = Vec::new();
            mask(&mut m, &vals[s..e], s, k, &d, Ranks::Table(&t));
            parts.extend(m);
        }
        assert_eq!(whole, parts);
        let kept = whole.iter().sum::<f64>() / 5000.0;
        assert!((kept - 0.7).abs() < 0.04, "{kept}");
    }

    #[test]
    fn table_bits_are_the_masks_decisions() {
        let vals: Vec<f64> = lcg(10_000, 5).iter().map(|v| (v * 3e3).round() / 3e3).collect();
        for (p, eps) in [(0.1, -0.1), (0.3, 0.5), (0.0, 0.0), (0.5, 2.0)] {
            let d = Dropout {
                p,
                della_eps: eps,
                rows: false,
                seed: 1,
            };
            let t = RankTable::build(&vals, eps);
            let k = stream(1, "k", 2);
            let mut m = Vec::new();
            mask(&mut m, &vals, 0, k, &d, Ranks::Table(&t));
            let bits = table_bits(&vals, k, &d, &t);
            let from_bits: Vec<f64> = (0..vals.len()).map(|j| ((bits[j / 64] >> (j % 64)) & 1) as f64).collect();
            assert_eq!(m, from_bits, "p {p} eps {eps}");
        }
    }

    #[test]
    fn below_matches_the_portable_compare() {
        let mut s = 3u32;
        let us: Vec<u32> = (0..64)
            .map(|i| {
                s = s.wrapping_mul(747796405).wrapping_add(2891336453);
                match i {
                    0 => 0,
                    1 => u32::MAX,
                    2 => 1 << 31,
                    _ => s,
                }
            })
            .collect();
        for t in [0u64, 1, 1 << 31, (1 << 31) + 1, u32::MAX as u64, 1 << 32, us[7] as u64] {
            let want = us
                .iter()
                .enumerate()
                .fold(0u64, |a, (i, &x)| a | (((x as u64) < t) as u64) << i);
            assert_eq!(below(&us, t), want, "t {t}");
        }
    }

    #[test]
    fn streams_differ_by_seed_key_and_model() {
        let a = stream(1, "k", 0);
        assert_ne!(a, stream(2, "k", 0));
        assert_ne!(a, stream(1, "k2", 0));
        assert_ne!(a, stream(1, "k", 1));
        assert_eq!(a, stream(1, "k", 0));
    }

    #[test]
    fn error_bad_probability() {
        let d = Dropout {
            p: 1.0,
            della_eps: 0.0,
            rows: false,
            seed: 0,
        };
        assert!(d.check().is_err());
        assert!(Dropout {
            p: 0.5,
            della_eps: f64::NAN,
            ..d
        }
        .check()
        .is_err());
    }
}

#[cfg(test)]
mod timing {
    #[test]
    #[ignore]
    fn time_build() {
        use half::f16;
        let n = 4_000_000usize;
        let mut s = 1u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let vals: Vec<f64> = (0..n)
            .map(|_| {
                let b = (rnd() - 0.5) * 0.2;
                let g = (rnd() + rnd() + rnd() - 1.5) * 4e-3;
                f16::from_f64(b + g).to_f64() - f16::from_f64(b).to_f64()
            })
            .collect();
        // A real delta tensor instead, where given (raw little-endian f64).
        let vals: Vec<f64> = match std::env::var("ASTOLFOMIX_DELTA") {
            Ok(p) => std::fs::read(p)
                .expect("delta file")
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Err(_) => vals,
        };
        let n = vals.len();
        let _ = super::RankTable::build(&vals, -0.1);
        let mut el = f64::MAX;
        let mut tab = super::RankTable::build(&vals, -0.1);
        for _ in 0..7 {
            let t = std::time::Instant::now();
            tab = super::RankTable::build(&vals, -0.1);
            el = el.min(t.elapsed().as_secs_f64());
        }
        let heavy: usize = tab.nodes.len();
        let samples: usize = tab.samples.len();
        eprintln!("n {n} q {} samples {samples} nodes {}", tab.q, tab.nodes.len());
        let t2 = std::time::Instant::now();
        let mut acc = 0.0;
        for (j, &v) in vals.iter().enumerate().step_by(10) {
            acc += tab.rank(v, j as u64);
        }
        let el2 = t2.elapsed().as_secs_f64();
        eprintln!(
            "build {:.2} ns/el, heavy buckets {heavy}, rank {:.1} ns/query ({acc})",
            el / n as f64 * 1e9,
            el2 / (n / 10) as f64 * 1e9
        );
    }
}
