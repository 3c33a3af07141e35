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
//! - A tensor-wide rank needs the whole tensor of one model: a [`DellaMask`] draws a model's mask
//!   in a statistics pass (one tensor of one model at a time, fed block by block as it is
//!   loaded; [`della_bits`] for a tensor at hand), with ranks estimated to within `TOL / |eps|`
//!   of n ([`ranks_of`]), so `q` is within `TOL` of the exact formula.
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

    /// The keep probability of an element of rank `rank` among `n`.
    fn q(&self, rank: f64, n: f64) -> f64 {
        let e = (rank / n - (n + 1.0) / (2.0 * n)) * self.della_eps;
        let e = if e.is_finite() { e } else { 0.0 };
        (1.0 - self.p + e).clamp(0.0, 1.0)
    }

    /// The keep probability without a rank term (DARE, or a tensor holding a NaN).
    fn q_plain(&self) -> f64 {
        (1.0 - self.p).clamp(0.0, 1.0)
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
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
    fn run_avx512(out: &mut [u32], key: [u32; 3], lo: u32, hi: u32) {
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
        if use_avx512() {
            // SAFETY: these AVX-512 subsets were detected on this CPU.
            unsafe { run_avx512(part, key, lo, hi) };
            done += left;
            continue;
        }
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

/// Whether the mask draws and DELLA ranks run their AVX-512 builds: the level allows AVX-512
/// (`ASTOLFOMIX_KERNEL` can cap it) and the CPU has the F, VL, BW and DQ subsets. (About 7%
/// faster than AVX2 for the ranks of a bench tensor; the robust loops stay at AVX2, where
/// AVX-512 measured slower.)
#[cfg(target_arch = "x86_64")]
fn use_avx512() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        crate::kernels::Level::detect().has_avx512()
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
    })
}

thread_local! {
    /// Per thread: the draws of [`mask`], kept between calls.
    static DRAWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a point's ranks are known, for [`mask`] (tensor-wide ranks go through [`della_bits`]).
#[derive(Clone, Copy)]
pub enum Ranks {
    /// No rank term (DARE).
    None,
    /// Ranks within rows of this length (the block holds whole rows).
    Rows(usize),
}

/// `ceil(x)` for `x` in `[0, 2^32]`: for an integer draw `u`, `u < x` exactly when `u < ceil(x)`,
/// so integer thresholds give the same decisions as the f64 comparison.
fn ceil_u64(x: f64) -> u64 {
    x.ceil() as u64
}

/// The keep mask (1 / 0) of one point's elements `start..start + vals.len()` into `out`: DARE, or
/// DELLA with ranks within rows.
pub fn mask<T: Real>(out: &mut Vec<T>, vals: &[T], start: usize, key: [u32; 3], d: &Dropout, ranks: Ranks) {
    out.clear();
    out.resize(vals.len(), T::ZERO);
    let one = |keep: bool| if keep { T::ONE } else { T::ZERO };
    let q0 = ceil_u64(d.q_plain() * TWO32);
    let ranks = if d.della_eps == 0.0 { Ranks::None } else { ranks };
    let mut u = DRAWS.with(|u| std::mem::take(&mut *u.borrow_mut()));
    u.clear();
    u.resize(vals.len(), 0);
    draws(&mut u, key, start as u64);
    match ranks {
        Ranks::None => out.iter_mut().zip(&u).for_each(|(m, &x)| *m = one((x as u64) < q0)),
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
                    let q = if nan { d.q_plain() } else { d.q(rank[i], n) };
                    *m = one((x as f64) < q * TWO32);
                }
            }
        }
    }
    DRAWS.with(|d| *d.borrow_mut() = u);
}

/// A whole tensor's DELLA mask with tensor-wide ranks (or a DARE mask), as bits: bit `j % 64` of
/// word `j / 64` is element `j`. The same as feeding the whole tensor to a [`DellaMask`].
pub fn della_bits<T: Real>(vals: &[T], key: [u32; 3], d: &Dropout) -> Vec<u64> {
    let mut m = DellaMask::new(vals.len(), key, d);
    m.feed(vals, vals.len());
    m.finish(vals)
}

/// Elements per step of the passes below: their per-element buffers stay in the L1 cache, and
/// an index within a step fits a `u16`.
const STEP: usize = 4096;

/// One model's DELLA mask over a whole tensor (tensor-wide ranks), drawn while the tensor is
/// loaded. Draws are integers, 64 at a time; draws below the band `1 - p -+ |eps|/2` are kept
/// and draws above it dropped whatever the rank, so only the draws inside it (a fraction |eps|
/// of the elements) need a rank. [`DellaMask::feed`] decides the others for each newly loaded
/// stretch while it is still in cache (keeping the band's positions, draws and keys, and the
/// tensor's key range); [`DellaMask::finish`] ranks the band ([`ranks_of`]) and decides it.
pub struct DellaMask {
    d: Dropout,
    key: [u32; 3],
    /// Draws below `lo` are kept, draws from `hi` on dropped.
    lo: u64,
    hi: u64,
    n: usize,
    /// Elements drawn so far (a multiple of 64 until the last).
    fed: usize,
    bits: Vec<u64>,
    /// The band's elements as bits (bit `j % 64` of word `j / 64`).
    inside: Vec<u64>,
    band: Band,
    range: KeyRange,
    u: Vec<u32>,
}

/// The draws of a [`DellaMask`] that need a rank, in position order.
#[derive(Default)]
struct Band {
    pos: Vec<u64>,
    draw: Vec<u32>,
    key: Vec<u64>,
}

impl DellaMask {
    /// The mask of `n` elements in stream `key`.
    pub fn new(n: usize, key: [u32; 3], d: &Dropout) -> DellaMask {
        let half = d.della_eps.abs() / 2.0;
        let (lo, hi) = if d.della_eps == 0.0 {
            let q0 = ceil_u64(d.q_plain() * TWO32);
            (q0, q0)
        } else {
            (
                ceil_u64((1.0 - d.p - half).clamp(0.0, 1.0) * TWO32),
                ceil_u64((1.0 - d.p + half).clamp(0.0, 1.0) * TWO32),
            )
        };
        DellaMask {
            d: *d,
            key,
            lo,
            hi,
            n,
            fed: 0,
            bits: vec![0u64; n.div_ceil(64)],
            inside: vec![0u64; n.div_ceil(64)],
            band: Band::default(),
            range: KeyRange::EMPTY,
            u: vec![0u32; STEP],
        }
    }

    /// Draws the elements of `vals` (the whole tensor, loaded up to `upto`) not drawn yet, up to
    /// the last multiple of 64 before `upto` (all of them once `upto` is the tensor's length).
    pub fn feed<T: Real>(&mut self, vals: &[T], upto: usize) {
        assert_eq!(vals.len(), self.n, "the whole tensor's buffer");
        feed_best(self, vals, upto)
    }

    /// The mask, once every element was fed (any left are drawn first).
    pub fn finish<T: Real>(mut self, vals: &[T]) -> Vec<u64> {
        self.feed(vals, self.n);
        finish_best(self, vals)
    }
}

/// `fn $name` runs `$imp` in its best build for this CPU: AVX-512 (F, VL, BW, DQ), AVX2, or
/// portable. The builds are the same code; the bits are the same.
macro_rules! best_build {
    ($name:ident => $imp:ident ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        fn $name<T: Real>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2<T: Real>($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
            fn avx512<T: Real>($($arg: $ty),*) -> $ret {
                $imp($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if use_avx512() {
                // SAFETY: these AVX-512 subsets were detected on this CPU.
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::Level::detect().has_avx2() {
                // SAFETY: AVX2 was detected on this CPU.
                return unsafe { avx2($($arg),*) };
            }
            $imp($($arg),*)
        }
    };
}

best_build!(feed_best => feed_impl(m: &mut DellaMask, vals: &[T], upto: usize) -> ());
best_build!(finish_best => finish_impl(m: DellaMask, vals: &[T]) -> Vec<u64>);

#[inline(always)]
fn feed_impl<T: Real>(m: &mut DellaMask, vals: &[T], upto: usize) {
    let end = if upto >= m.n { m.n } else { upto / 64 * 64 };
    while m.fed < end {
        let start = m.fed; // a multiple of 64: words never straddle steps
        let part = &vals[start..(start + STEP).min(end)];
        let u = &mut m.u[..part.len()];
        draws(u, m.key, start as u64);
        m.range = m.range.join(KeyRange::of(part));
        for (w, us) in u.chunks(64).enumerate() {
            let keep = below(us, m.lo);
            let mut inside = below(us, m.hi) & !keep;
            m.bits[start / 64 + w] = keep;
            m.inside[start / 64 + w] = inside;
            while inside != 0 {
                let i = inside.trailing_zeros() as usize;
                inside &= inside - 1;
                let j = start + w * 64 + i;
                m.band.pos.push(j as u64);
                m.band.draw.push(us[i]);
                m.band.key.push(part[j - start].rank_key());
            }
        }
        m.fed = start + part.len();
    }
}

#[inline(always)]
fn finish_impl<T: Real>(m: DellaMask, vals: &[T]) -> Vec<u64> {
    let DellaMask {
        d,
        mut bits,
        inside,
        band,
        range,
        ..
    } = m;
    if band.pos.is_empty() {
        return bits;
    }
    // (not a closure: it would not inherit the caller's AVX2)
    let ranks = if range.nan {
        None
    } else {
        Some(ranks_core(vals, d.della_eps, &band.pos, &band.key, &inside, range))
    };
    let n = vals.len() as f64;
    for (k, (&j, &x)) in band.pos.iter().zip(&band.draw).enumerate() {
        // a tensor with a NaN has no rank term: q = 1 - p
        let q = match &ranks {
            Some(r) => d.q(r[k], n),
            None => d.q_plain(),
        };
        // (no branch: a band element is kept about half the time)
        bits[j as usize / 64] |= (((x as f64) < q * TWO32) as u64) << (j % 64);
    }
    bits
}

/// Bit `i` set where `us[i] < t` (at most 64 draws; `t` up to 2^32).
fn below(us: &[u32], t: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if us.len() == 64 && use_avx512() {
        // SAFETY: these AVX-512 subsets were detected on this CPU; `us` holds 64 draws.
        return unsafe { below_avx512(us, t) };
    }
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

/// [`below`] 16 draws at a time: AVX-512 compares unsigned and gives the mask itself.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
fn below_avx512(us: &[u32], t: u64) -> u64 {
    use std::arch::x86_64::*;
    if t > u32::MAX as u64 {
        return u64::MAX;
    }
    let tv = _mm512_set1_epi32(t as u32 as i32);
    let mut out = 0u64;
    for g in 0..4 {
        // SAFETY: `us` holds 64 draws, so lanes g * 16 .. g * 16 + 16 are in it.
        let x = unsafe { _mm512_loadu_si512(us.as_ptr().add(g * 16) as *const _) };
        out |= (_mm512_cmplt_epu32_mask(x, tv) as u64) << (g * 16);
    }
    out
}

/// The range of a tensor's rank keys (`|v|` as f64 bits, monotone): the smallest non-zero key,
/// the largest key, and whether a key is a NaN's.
#[derive(Clone, Copy)]
struct KeyRange {
    min: u64,
    max: u64,
    nan: bool,
}

impl KeyRange {
    const EMPTY: KeyRange = KeyRange {
        min: u64::MAX,
        max: 0,
        nan: false,
    };
    /// Bits of +infinity: every larger key of `|v|` is a NaN's.
    const INF: u64 = 0x7ff0_0000_0000_0000;

    /// A loop without branches (zeros and NaNs are selected, not skipped), so it vectorizes.
    #[inline(always)]
    fn of<T: Real>(vals: &[T]) -> KeyRange {
        let (mut min, mut max) = (u64::MAX, 0u64);
        for &v in vals {
            let k = v.rank_key();
            min = min.min(if k == 0 { u64::MAX } else { k });
            max = max.max(k);
        }
        KeyRange {
            min,
            max,
            nan: max > Self::INF,
        }
    }

    fn join(self, o: KeyRange) -> KeyRange {
        KeyRange {
            min: self.min.min(o.min),
            max: self.max.max(o.max),
            nan: self.nan | o.nan,
        }
    }
}

/// Buckets of the first counting level at most (its counts stay in the L2 cache).
const BUCKETS: usize = 1 << 16;
/// Bits the second level splits a heavy bucket by.
const SUB_BITS: u32 = 8;
/// Marks a bucket a sweep does not visit (no slots), and a slot without a sorted part.
const NONE: u32 = u32::MAX;
/// Unused slots after each bucket's: its slots start a cache line further along, modulo 4 KB,
/// than the previous bucket's. fp16 deltas leave the low key bits zero, so the slots in use sat
/// at the same place in every 4 KB bucket table, and a load of one waited on stores to others
/// (4K aliasing: measured 10% of the ranking time).
const SLOT_PAD: usize = 4;
/// The key of a slot no element has reached yet.
const NO_KEY: u64 = u64::MAX;
/// A slot whose elements hold more than one key.
const MIXED: u64 = u64::MAX - 1;

/// The first counting level: zero alone in bucket 0, the non-zero keys by their top bits in at
/// most 65536 buckets over the tensor's non-zero range (keys of the tensor the range is of).
struct Buckets {
    shift: u32,
    /// The smallest non-zero key with its low `shift` bits cleared.
    base: u64,
    nb: usize,
}

impl Buckets {
    fn new(range: KeyRange, n: usize) -> Buckets {
        // (all zeros: an empty non-zero range, one unused bucket)
        let kmax = range.max.max(1);
        let kmin = range.min.min(kmax);
        // About n / 16 buckets: the tables (about 40 bytes a bucket) stay smaller than the
        // tensor (measured: the bench's DGMLA 4% faster than with n buckets; light buckets
        // still give ranks within tolerance, heavier ones are split below).
        let cap = (n / 16).clamp(256, BUCKETS) as u64;
        let mut shift = 0;
        while (kmax >> shift) - (kmin >> shift) >= cap {
            shift += 1;
        }
        Buckets {
            shift,
            base: (kmin >> shift) << shift,
            nb: ((kmax >> shift) - (kmin >> shift) + 2) as usize,
        }
    }

    /// (a select, not a branch: zeros are common and unpredictable; no clamp, as every non-zero
    /// key is in the range)
    #[inline(always)]
    fn of(&self, k: u64) -> u32 {
        let b = ((k.wrapping_sub(self.base) >> self.shift) as u32).wrapping_add(1);
        if k == 0 {
            0
        } else {
            b
        }
    }
}

/// The ordinal ranks (1..n, ties by position) of `|v_j|` within `vals` for the positions
/// `wanted` (strictly increasing), each within `T / 2` of the exact rank, `T <= 1.8e-4 n /
/// |eps|`: the keep probability is then within 0.9e-4 of the exact formula. `None` if `vals`
/// holds a NaN.
pub fn ranks_of<T: Real>(vals: &[T], della_eps: f64, wanted: &[u64]) -> Option<Vec<f64>> {
    assert!(wanted.windows(2).all(|w| w[0] < w[1]), "wanted positions must increase");
    let range = KeyRange::of(vals);
    if range.nan {
        return None;
    }
    let keys: Vec<u64> = wanted.iter().map(|&j| vals[j as usize].rank_key()).collect();
    let mut want_bits = vec![0u64; vals.len().div_ceil(64)];
    wanted.iter().for_each(|&j| want_bits[j as usize / 64] |= 1 << (j % 64));
    Some(ranks_core(vals, della_eps, wanted, &keys, &want_bits, range))
}

/// [`ranks_of`] for wanted positions given with their keys and as bits, over a tensor of key
/// range `range` (no NaN).
///
/// A counting sweep buckets the keys ([`Buckets`]); a wanted element of a bucket of at most `T`
/// elements gets the bucket's middle rank. The elements of the heavier buckets that hold a
/// wanted element are visited in position order and each such bucket is split by the next 8
/// bits, counting each sub-bucket's elements as it goes and noting whether it holds more than
/// one key: a wanted element of a light sub-bucket gets its middle rank, one of a sub-bucket of
/// a single key (fp16 deltas repeat values: the common case) its exact rank, since ties rank by
/// position and the running count is that position. The elements of the few heavy sub-buckets
/// of several keys that hold a wanted element are sorted, which places those exactly. No sort of
/// the tensor, no per-element table.
///
/// Which buckets are heavy is known only once all are counted, but the wanted elements of a
/// DELLA band are a uniform sample of the tensor (draws do not depend on values): the buckets
/// where the sample is dense are visited in the counting sweep itself, while the tensor is in
/// cache, and a second sweep visits any heavy bucket the sample missed (rare; it makes the
/// ranks the same whatever the sample).
#[inline(always)]
fn ranks_core<T: Real>(vals: &[T], della_eps: f64, wanted: &[u64], keys: &[u64], want_bits: &[u64], range: KeyRange) -> Vec<f64> {
    let n = vals.len();
    let mut ranks = vec![0f64; wanted.len()];
    if wanted.is_empty() {
        return ranks;
    }
    let q = ((1.8 * TOL * n as f64 / della_eps.abs().max(1e-300)).floor() as u64).max(1);
    let bk = Buckets::new(range, n);
    let mut wanted_in = vec![0u64; bk.nb];
    keys.iter().for_each(|&k| wanted_in[bk.of(k) as usize] += 1);
    // A heavy bucket (more than q elements) holds about q f wanted ones or more (f the wanted
    // share). Visiting a light bucket costs about as much as missing a heavy one (a second
    // sweep), and light buckets near q outnumber heavy ones: the cut is at 0.8 q f, where a
    // bucket of 1.2 q is missed less than once in 1000. Below 64 the sample says too little.
    let theta = wanted.len() as f64 / n as f64 * q as f64 * 0.8;
    let likely: Vec<u32> = if theta >= 64.0 {
        (0..bk.nb as u32).filter(|&b| wanted_in[b as usize] as f64 >= theta).collect()
    } else {
        Vec::new()
    };
    let mut count = vec![0u64; bk.nb];
    let mut first = Ties::new(&bk, &likely, &wanted_in);
    sweep(vals, &bk, Some(&mut count), &mut first, want_bits);
    let is_heavy = |b: u32| count[b as usize] > q;
    let missed: Vec<u32> = (0..bk.nb as u32)
        .filter(|&b| is_heavy(b) && wanted_in[b as usize] > 0 && first.off[b as usize] == NONE)
        .collect();
    let mut second = Ties::new(&bk, &missed, &wanted_in);
    if !missed.is_empty() {
        sweep(vals, &bk, None, &mut second, want_bits);
    }
    let below_root = prefix(&count);
    let mid = |count: u64| count.saturating_sub(1) as f64 / 2.0 + 1.0;
    // Which visited set holds bucket `b`, if any.
    let set = |b: u32| {
        if first.off[b as usize] != NONE {
            Some(0)
        } else if second.off[b as usize] != NONE {
            Some(1)
        } else {
            None
        }
    };
    // Every wanted element first gets its bucket's middle rank (a lookup, no branch); those of
    // heavy visited buckets are then placed within their bucket, set by set.
    let light: Vec<f64> = below_root.iter().zip(&count).map(|(&b, &c)| b as f64 + mid(c)).collect();
    ranks.iter_mut().zip(keys).for_each(|(r, &k)| *r = light[bk.of(k) as usize]);
    // Per visited set, its heavy slots of several keys that hold a wanted element: sorted below.
    let mut sorted: [Vec<u32>; 2] = [vec![NONE; first.slots.len()], vec![NONE; second.slots.len()]];
    let mut parts: Vec<Vec<(u64, u64)>> = Vec::new();
    for (s, t) in [&first, &second].into_iter().enumerate() {
        if t.slots.is_empty() {
            continue;
        }
        // the set's wanted elements, in position order as its `seen` entries, listed without a
        // branch (the spare entry takes the last write)
        let mut list = vec![0u32; t.seen.len()];
        let mut m = 0;
        for (w, &k) in keys.iter().enumerate() {
            list[m] = w as u32;
            m += (t.off[bk.of(k) as usize] != NONE) as usize;
        }
        for (&w, &(i, c)) in list[..m].iter().zip(&t.seen) {
            let b = bk.of(keys[w as usize]);
            if !is_heavy(b) {
                continue;
            }
            let (cnt, key) = t.slots[i as usize];
            ranks[w as usize] = (below_root[b as usize] + t.below_sub[i as usize]) as f64
                + if cnt <= q {
                    mid(cnt)
                } else if key != MIXED {
                    (c + 1) as f64
                } else {
                    let sp = &mut sorted[s][i as usize];
                    if *sp == NONE {
                        *sp = parts.len() as u32;
                        parts.push(Vec::new());
                    }
                    0.0 // the place within is added below
                };
        }
    }
    if !parts.is_empty() {
        // Heavy sub-buckets of several keys (rare): their elements sorted by (key, position).
        let part_of = |k: u64| {
            let b = bk.of(k);
            match set(b) {
                Some(s) if is_heavy(b) => {
                    let t = if s == 0 { &first } else { &second };
                    sorted[s][t.slot(b, k) as usize]
                }
                _ => NONE,
            }
        };
        for (j, &v) in vals.iter().enumerate() {
            let k = v.rank_key();
            let p = part_of(k);
            if p != NONE {
                parts[p as usize].push((k, j as u64));
            }
        }
        parts.iter_mut().for_each(|p| p.sort_unstable());
        for ((r, &k), &j) in ranks.iter_mut().zip(keys).zip(wanted) {
            let p = part_of(k);
            if p != NONE {
                *r += (parts[p as usize].partition_point(|&x| x < (k, j)) + 1) as f64;
            }
        }
    }
    ranks
}

/// The buckets a [`sweep`] visits, split into sub-buckets (slots), and what it found.
struct Ties {
    /// Per bucket: its first slot, or NONE where not visited; and as bits.
    off: Vec<u32>,
    bits: Vec<u64>,
    shift2: u32,
    sub_mask: u64,
    /// Per slot: its count and its key (NO_KEY before its first element, MIXED after a second
    /// key); then the counts of the slots before it within its bucket.
    slots: Vec<(u64, u64)>,
    below_sub: Vec<u64>,
    /// Per wanted element of a visited bucket, in position order: its slot and the count of the
    /// slot's elements before it (one spare entry: every element writes the next one).
    seen: Vec<(u32, u64)>,
}

impl Ties {
    fn new(bk: &Buckets, buckets: &[u32], wanted_in: &[u64]) -> Ties {
        let sub_bits = bk.shift.min(SUB_BITS);
        let nsub = 1usize << sub_bits;
        let mut off = vec![NONE; bk.nb];
        let mut bits = vec![0u64; bk.nb.div_ceil(64)];
        let mut seen = 1;
        for (i, &b) in buckets.iter().enumerate() {
            off[b as usize] = (i * (nsub + SLOT_PAD)) as u32;
            bits[b as usize / 64] |= 1 << (b % 64);
            seen += wanted_in[b as usize] as usize;
        }
        Ties {
            off,
            bits,
            shift2: bk.shift - sub_bits,
            sub_mask: (nsub - 1) as u64,
            slots: vec![(0, NO_KEY); buckets.len() * (nsub + SLOT_PAD)],
            below_sub: Vec::new(),
            seen: vec![(0, 0); seen],
        }
    }

    #[inline(always)]
    fn slot(&self, b: u32, k: u64) -> u32 {
        self.off[b as usize] + ((k >> self.shift2) & self.sub_mask) as u32
    }
}

/// One pass over the tensor in position order: each step's buckets (kept in the L1 cache),
/// counted into `count` when given, and the elements of the buckets `t` visits, listed without
/// a branch and counted into their slots.
#[inline(always)]
fn sweep<T: Real>(vals: &[T], bk: &Buckets, mut count: Option<&mut [u64]>, t: &mut Ties, want_bits: &[u64]) {
    // Four tables, one per element position mod 4: an increment rarely waits on the one before
    // (repeated values hit one counter in a row). u32 counts per step-sized run, added to the
    // u64 totals before they could overflow.
    let mut part_count = if count.is_some() { vec![0u32; 4 * bk.nb] } else { Vec::new() };
    let mut pending = 0usize;
    let visits = !t.slots.is_empty();
    let mut bucket = vec![0u32; STEP.min(vals.len())];
    // (16 spare entries: the AVX-512 listing stores 16 at a time)
    let mut list = vec![0u16; STEP.min(vals.len()) + 16];
    let mut next = 0usize;
    for (c0, part) in vals.chunks(STEP).enumerate() {
        let bs = &mut bucket[..part.len()];
        bs.iter_mut().zip(part).for_each(|(b, &v)| *b = bk.of(v.rank_key()));
        if count.is_some() {
            let (t0, rest) = part_count.split_at_mut(bk.nb);
            let (t1, rest) = rest.split_at_mut(bk.nb);
            let (t2, t3) = rest.split_at_mut(bk.nb);
            let mut quads = bs.chunks_exact(4);
            for q4 in &mut quads {
                t0[q4[0] as usize] += 1;
                t1[q4[1] as usize] += 1;
                t2[q4[2] as usize] += 1;
                t3[q4[3] as usize] += 1;
            }
            for &b in quads.remainder() {
                t0[b as usize] += 1;
            }
            pending += bs.len();
            if pending > (u32::MAX as usize) - STEP {
                flush(count.as_deref_mut().expect("counting"), &mut part_count);
                pending = 0;
            }
        }
        if !visits {
            continue;
        }
        let m = list_visited(bs, &t.bits, &mut list);
        for &e in &list[..m] {
            let (e, j) = (e as usize, c0 * STEP + e as usize);
            let k = part[e].rank_key();
            let i = t.slot(bs[e], k);
            let st = &mut t.slots[i as usize];
            let c = st.0;
            st.0 = c + 1;
            st.1 = if st.1 == NO_KEY || st.1 == k { k } else { MIXED };
            // every element writes the next entry; only a wanted one keeps it
            t.seen[next] = (i, c);
            next += ((want_bits[j / 64] >> (j % 64)) & 1) as usize;
        }
    }
    if let Some(count) = count {
        flush(count, &mut part_count);
    }
    // Slot counts below each slot, within its bucket.
    let stride = t.sub_mask as usize + 1 + SLOT_PAD;
    t.below_sub = vec![0u64; t.slots.len()];
    for (below, slots) in t.below_sub.chunks_mut(stride).zip(t.slots.chunks(stride)) {
        let mut acc = 0;
        for (b, s) in below.iter_mut().zip(slots) {
            *b = acc;
            acc += s.0;
        }
    }
}

/// Lists, into `list` (16 entries longer than `bs`), the indices of `bs` whose bucket has its
/// bit set in `bits`; returns how many.
#[inline(always)]
fn list_visited(bs: &[u32], bits: &[u64], list: &mut [u16]) -> usize {
    assert!(list.len() >= bs.len() + 16 && bs.len() <= 1 << 16);
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: these AVX-512 subsets were detected on this CPU; the lengths were checked.
        return unsafe { list_visited_avx512(bs, bits, list) };
    }
    list_visited_portable(bs, bits, list, 0, 0)
}

/// Without a branch: every index is written, the count advances where the bit is set.
#[inline(always)]
fn list_visited_portable(bs: &[u32], bits: &[u64], list: &mut [u16], from: usize, mut m: usize) -> usize {
    for (e, &b) in bs.iter().enumerate().skip(from) {
        list[m] = e as u16;
        m += ((bits[b as usize / 64] >> (b % 64)) & 1) as usize;
    }
    m
}

/// [`list_visited`] 16 buckets at a time: their bits gathered as 32-bit words, the set ones'
/// indices compressed together and stored as 16-bit values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
fn list_visited_avx512(bs: &[u32], bits: &[u64], list: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let words = bits.as_ptr() as *const i32;
    let (one, low5) = (_mm512_set1_epi32(1), _mm512_set1_epi32(31));
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sixteen = _mm512_set1_epi32(16);
    let mut m = 0;
    let mut e = 0;
    while e + 16 <= bs.len() {
        // SAFETY: `bs` holds 16 values from `e`; every bucket's 32-bit word is within `bits`
        // (little-endian: bit b of the u64s is bit b % 32 of u32 word b / 32); `list` holds
        // 16 entries from `m <= e`.
        unsafe {
            let b = _mm512_loadu_si512(bs.as_ptr().add(e) as *const _);
            let w = _mm512_i32gather_epi32::<4>(_mm512_srli_epi32::<5>(b), words);
            let set = _mm512_test_epi32_mask(_mm512_srlv_epi32(w, _mm512_and_si512(b, low5)), one);
            let packed = _mm512_maskz_compress_epi32(set, idx);
            _mm256_storeu_si256(list.as_mut_ptr().add(m) as *mut __m256i, _mm512_cvtepi32_epi16(packed));
            m += set.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, sixteen);
        e += 16;
    }
    list_visited_portable(bs, bits, list, e, m)
}

/// Adds the four partial tables of `part` into `count` and empties them.
fn flush(count: &mut [u64], part: &mut [u32]) {
    let nb = count.len();
    for (t, c) in count.iter_mut().enumerate() {
        *c += (0..4).map(|i| part[i * nb + t] as u64).sum::<u64>();
    }
    part.fill(0);
}

/// Exclusive prefix sums, one entry more than `count`.
fn prefix(count: &[u64]) -> Vec<u64> {
    let mut below = Vec::with_capacity(count.len() + 1);
    let mut acc = 0;
    for &c in count {
        below.push(acc);
        acc += c;
    }
    below.push(acc);
    below
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

    fn all_ranks(vals: &[f64], eps: f64) -> Vec<f64> {
        let wanted: Vec<u64> = (0..vals.len() as u64).collect();
        ranks_of(vals, eps, &wanted).expect("no NaN")
    }

    fn max_err(vals: &[f64], eps: f64) -> f64 {
        let r = all_ranks(vals, eps);
        let ex = exact(vals);
        let n = vals.len() as f64;
        r.iter()
            .zip(&ex)
            .map(|(a, b)| (a - b).abs() / n * eps.abs())
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
        assert_eq!(max_err(&zeros, 0.5), 0.0);
        // Small tensors are exact.
        let small = lcg(100, 2);
        assert_eq!(max_err(&small, 0.1), 0.0);
    }

    #[test]
    fn heavy_parts_of_several_keys_are_placed_exactly() {
        // Two close keys repeated many times share every bucket and sub-bucket: the sorted path.
        let a = 1.0f64;
        let b = f64::from_bits(a.to_bits() + 1);
        let vals: Vec<f64> = (0..20_000).map(|i| if (i * 7919) % 3 == 0 { a } else { -b }).collect();
        assert_eq!(all_ranks(&vals, 0.5), exact(&vals));
        // only some positions wanted, in order
        let wanted = [3u64, 4, 17, 19_999];
        let r = ranks_of(&vals, 0.5, &wanted).unwrap();
        let ex = exact(&vals);
        assert_eq!(r, wanted.iter().map(|&j| ex[j as usize]).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_do_not_depend_on_which_heavy_buckets_the_sample_predicts() {
        // A value repeated 5000 times among 100k continuous ones: one heavy bucket.
        let mut vals = lcg(105_000, 4);
        let rep: Vec<usize> = (0..5000).map(|i| i * 21 + 3).collect();
        rep.iter().for_each(|&j| vals[j] = 2.5e-4);
        let ex = exact(&vals);
        // Every position wanted: the sample sees the heavy bucket, visited in the counting sweep.
        let all = all_ranks(&vals, 0.1);
        // Only three of the repeated value wanted: the sample misses it (a second sweep).
        let few: Vec<u64> = (0..vals.len() as u64)
            .filter(|&j| vals[j as usize] != 2.5e-4 || [rep[7], rep[2500], rep[4999]].contains(&(j as usize)))
            .collect();
        let some = ranks_of(&vals, 0.1, &few).unwrap();
        for (r, &j) in some.iter().zip(&few) {
            assert_eq!(*r, all[j as usize], "position {j}");
        }
        for &j in &[rep[7], rep[2500], rep[4999]] {
            assert_eq!(all[j], ex[j], "ties rank by position");
        }
        let n = vals.len() as f64;
        let worst = all.iter().zip(&ex).map(|(a, b)| (a - b).abs() / n * 0.1).fold(0.0, f64::max);
        assert!(worst <= TOL, "{worst}");
    }

    #[test]
    fn nan_tensor_has_no_rank_term() {
        assert!(ranks_of(&[1.0, f64::NAN, 2.0], 0.1, &[0]).is_none());
        let d = Dropout {
            p: 0.5,
            della_eps: 0.1,
            rows: false,
            seed: 3,
        };
        let vals: Vec<f64> = (0..1000).map(|i| if i == 7 { f64::NAN } else { i as f64 }).collect();
        let bits = della_bits(&vals, stream(3, "k", 0), &d);
        let mut plain = Vec::new();
        mask(
            &mut plain,
            &vals,
            0,
            stream(3, "k", 0),
            &Dropout { della_eps: 0.0, ..d },
            Ranks::None,
        );
        let from_bits: Vec<f64> = (0..vals.len()).map(|j| ((bits[j / 64] >> (j % 64)) & 1) as f64).collect();
        assert_eq!(from_bits, plain);
    }

    #[test]
    fn masks_do_not_depend_on_block_boundaries() {
        let d = Dropout {
            p: 0.3,
            della_eps: 0.0,
            rows: false,
            seed: 7,
        };
        let vals = lcg(5000, 9);
        let k = stream(d.seed, "model.diffusion_model.x.weight", 4);
        let mut whole = Vec::new();
        mask(&mut whole, &vals, 0, k, &d, Ranks::None);
        let mut parts = Vec::new();
        for s in (0..5000).step_by(777) {
            let e = (s + 777).min(5000);
            let mut m = Vec::new();
            mask(&mut m, &vals[s..e], s, k, &d, Ranks::None);
            parts.extend(m);
        }
        assert_eq!(whole, parts);
        let kept = whole.iter().sum::<f64>() / 5000.0;
        assert!((kept - 0.7).abs() < 0.04, "{kept}");
    }

    #[test]
    fn della_bits_are_the_formulas_decisions() {
        let vals: Vec<f64> = lcg(10_000, 5).iter().map(|v| (v * 3e3).round() / 3e3).collect();
        for (p, eps) in [(0.1, -0.1), (0.3, 0.5), (0.0, 0.0), (0.5, 2.0)] {
            let d = Dropout {
                p,
                della_eps: eps,
                rows: false,
                seed: 1,
            };
            let k = stream(1, "k", 2);
            let mut u = vec![0u32; vals.len()];
            draws(&mut u, k, 0);
            let r = all_ranks(&vals, eps);
            let n = vals.len() as f64;
            let bits = della_bits(&vals, k, &d);
            for j in 0..vals.len() {
                let want = (u[j] as f64) < d.q(r[j], n) * TWO32;
                assert_eq!((bits[j / 64] >> (j % 64)) & 1 == 1, want, "p {p} eps {eps} j {j}");
            }
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
    fn listing_matches_the_plain_loop() {
        let mut s = 7u32;
        let mut rnd = || {
            s = s.wrapping_mul(747796405).wrapping_add(2891336453);
            s >> 8
        };
        for (nb, len) in [
            (1usize, 1usize),
            (40, 15),
            (100, 16),
            (1000, 17),
            (70_000, 4096),
            (65_538, 4095),
        ] {
            let bits: Vec<u64> = (0..nb.div_ceil(64))
                .map(|_| ((rnd() as u64) << 40) ^ ((rnd() as u64) << 20) ^ rnd() as u64)
                .collect();
            let mut bs: Vec<u32> = (0..len).map(|_| rnd() % nb as u32).collect();
            bs[0] = nb as u32 - 1; // the last bucket's word is read too
            let want: Vec<u16> = (0..len)
                .filter(|&e| (bits[bs[e] as usize / 64] >> (bs[e] % 64)) & 1 == 1)
                .map(|e| e as u16)
                .collect();
            let mut list = vec![0u16; len + 16];
            let m = list_visited(&bs, &bits, &mut list);
            assert_eq!(&list[..m], &want[..], "{nb} buckets, {len} values");
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
    /// `cargo test --release time_della -- --ignored --nocapture`; `ASTOLFOMIX_DELTA=FILE` (raw
    /// little-endian f64) times a real delta tensor instead of the synthetic one.
    #[test]
    #[ignore]
    fn time_della() {
        use half::f16;
        let mut s = 1u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let vals: Vec<f64> = match std::env::var("ASTOLFOMIX_DELTA") {
            Ok(p) => std::fs::read(p)
                .expect("delta file")
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Err(_) => (0..4_000_000)
                .map(|_| {
                    let b = (rnd() - 0.5) * 0.2;
                    let g = (rnd() + rnd() + rnd() - 1.5) * 4e-3;
                    f16::from_f64(b + g).to_f64() - f16::from_f64(b).to_f64()
                })
                .collect(),
        };
        let d = super::Dropout {
            p: 0.1,
            della_eps: -0.1,
            rows: false,
            seed: 0,
        };
        let key = super::stream(0, "k", 0);
        let mut best = f64::MAX;
        let (mut kept, mut hash) = (0, 0u64);
        for _ in 0..7 {
            let t = std::time::Instant::now();
            let bits = super::della_bits(&vals, key, &d);
            best = best.min(t.elapsed().as_secs_f64());
            kept = bits.iter().map(|w| w.count_ones()).sum::<u32>();
            // FNV-1a over the words: "same bits" checks across changes
            hash = bits
                .iter()
                .fold(0xcbf2_9ce4_8422_2325, |h, &w| (h ^ w).wrapping_mul(0x100_0000_01b3));
        }
        eprintln!(
            "della_bits {:.2} ns/el over {} ({kept} kept, bits {hash:016x})",
            best / vals.len() as f64 * 1e9,
            vals.len()
        );
    }
}
