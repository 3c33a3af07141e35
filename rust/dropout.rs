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
//! - A tensor-wide rank needs the whole tensor of one model: [`della_bits`] draws a model's mask
//!   from it in a statistics pass (one tensor of one model at a time), with ranks estimated to
//!   within `TOL / |eps|` of n ([`ranks_of`]), so `q` is within `TOL` of the exact formula.
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
/// word `j / 64` is element `j`. Draws are integers, 64 at a time; draws below the band
/// `1 - p -+ |eps|/2` are kept and draws above it dropped whatever the rank, so only the draws
/// inside it (a fraction |eps| of the elements) need a rank, computed for just those by
/// [`ranks_of`].
pub fn della_bits<T: Real>(vals: &[T], key: [u32; 3], d: &Dropout) -> Vec<u64> {
    const STEP: usize = 4096; // a multiple of 64: words never straddle steps
    let mut bits = vec![0u64; vals.len().div_ceil(64)];
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
    // positions and draws of the draws inside the band, in position order
    let (mut band, mut band_u): (Vec<u64>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut u = vec![0u32; STEP];
    for (c, part) in vals.chunks(STEP).enumerate() {
        let start = c * STEP;
        let u = &mut u[..part.len()];
        draws(u, key, start as u64);
        for (w, us) in u.chunks(64).enumerate() {
            let keep = below(us, lo);
            let mut inside = below(us, hi) & !keep;
            bits[start / 64 + w] = keep;
            while inside != 0 {
                let i = inside.trailing_zeros() as usize;
                inside &= inside - 1;
                band.push((start + w * 64 + i) as u64);
                band_u.push(us[i]);
            }
        }
    }
    if band.is_empty() {
        return bits;
    }
    let ranks = ranks_of(vals, d.della_eps, &band);
    let n = vals.len() as f64;
    for (k, (&j, &x)) in band.iter().zip(&band_u).enumerate() {
        // a tensor with a NaN has no rank term: q = 1 - p
        let q = match &ranks {
            Some(r) => d.q(r[k], n),
            None => d.q_plain(),
        };
        if (x as f64) < q * TWO32 {
            bits[j as usize / 64] |= 1 << (j % 64);
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

/// Buckets of the first counting level at most (its counts stay in the L2 cache).
const BUCKETS: usize = 1 << 16;
/// Bits the second level splits a heavy bucket by.
const SUB_BITS: u32 = 8;

/// The ordinal ranks (1..n, ties by position) of `|v_j|` within `vals` for the positions
/// `wanted` (increasing), each within `T / 2` of the exact rank, `T <= 1.8e-4 n / |eps|`: the keep
/// probability is then within 0.9e-4 of the exact formula. `None` if `vals` holds a NaN.
///
/// Keys are the bits of `|v|` as an f64 (monotone). A first counting pass buckets them by their
/// top bits (zero alone in bucket 0, at most 65536 buckets over the non-zero range); a wanted
/// element of a bucket of at most `T` elements gets the bucket's middle rank. A second pass, in
/// position order, splits every heavier bucket by the next 8 bits, counting each sub-bucket's
/// elements as it goes and noting whether it holds more than one key: a wanted element of a light
/// sub-bucket gets its middle rank, one of a sub-bucket of a single key (fp16 deltas repeat values:
/// the common case) its exact rank, since ties rank by position and the running count is that
/// position. The elements of the few heavy sub-buckets of several keys that hold a wanted
/// element are sorted, which places those exactly. No sort of the tensor, no per-element table.
pub fn ranks_of<T: Real>(vals: &[T], della_eps: f64, wanted: &[u64]) -> Option<Vec<f64>> {
    let n = vals.len();
    let mut ranks = vec![0f64; wanted.len()];
    if wanted.is_empty() {
        return Some(ranks);
    }
    let q = ((1.8 * TOL * n as f64 / della_eps.abs().max(1e-300)).floor() as u64).max(1);
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
    if nan {
        return None;
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
    let base = kmin >> shift;
    // (a multiply by `k != 0`, not a branch: zeros are common and unpredictable)
    let bucket = |k: u64| -> usize { (((k >> shift).saturating_sub(base) + 1) as usize).min(nb - 1) * (k != 0) as usize };
    // Pass 1: counts per bucket.
    let mut count = vec![0u64; nb];
    for &v in vals {
        count[bucket(key(v))] += 1;
    }
    let below_root = prefix(&count);
    // Pass 2: heavy buckets split into sub-buckets (light buckets count into a spare range, so
    // the loop does not branch on them); per wanted element: its bucket, sub-bucket and the
    // count of its sub-bucket's elements before it.
    let sub_bits = shift.min(SUB_BITS);
    let (shift2, nsub) = (shift - sub_bits, 1usize << sub_bits);
    let heavy: Vec<usize> = (0..nb).filter(|&b| count[b] > q).collect();
    let spare = heavy.len() * nsub;
    let mut off = vec![spare as u32; nb];
    for (h, &b) in heavy.iter().enumerate() {
        off[b] = (h * nsub) as u32;
    }
    let slots = spare + nsub;
    let sub_mask = (nsub - 1) as u64;
    let slot = |k: u64| off[bucket(k)] as usize + ((k >> shift2) & sub_mask) as usize;
    let (mut cnt, mut first, mut mixed) = (vec![0u64; slots], vec![0u64; slots], vec![false; slots]);
    // (sub-bucket, elements of the sub-bucket before it) per wanted element, recorded without a
    // branch: each element writes the next entry, which only a wanted one keeps.
    let mut seen: Vec<(u32, u64)> = vec![(0, 0); wanted.len() + 1];
    let mut next = 0usize;
    let mut want = wanted[0];
    let mut idx = vec![0u32; 4096.min(n)];
    for (c0, part) in vals.chunks(4096).enumerate() {
        // the slots of a chunk first (a loop that vectorizes), then the counting
        for (o, &v) in idx.iter_mut().zip(part) {
            *o = slot(key(v)) as u32;
        }
        for (e, (&i, &v)) in idx.iter().zip(part).enumerate() {
            let (i, k, j) = (i as usize, key(v), (c0 * 4096 + e) as u64);
            let c = cnt[i];
            cnt[i] = c + 1;
            if c == 0 {
                first[i] = k;
            }
            mixed[i] |= k != first[i];
            seen[next] = (i as u32, c);
            let hit = (j == want) as usize;
            next += hit;
            want = if hit == 1 {
                wanted.get(next).copied().unwrap_or(u64::MAX)
            } else {
                want
            };
        }
    }
    seen.truncate(wanted.len());
    // Sub-bucket counts below each sub-bucket, within its bucket.
    let mut below_sub = vec![0u64; slots];
    for h in 0..=heavy.len() {
        let mut acc = 0;
        for i in h * nsub..(h + 1) * nsub {
            below_sub[i] = acc;
            acc += cnt[i];
        }
    }
    let mid = |count: u64| count.saturating_sub(1) as f64 / 2.0 + 1.0;
    let mut sorted_parts: std::collections::HashMap<usize, Vec<(u64, u64)>> = std::collections::HashMap::new();
    for (k, &(i, c)) in seen.iter().enumerate() {
        let (b, i) = (bucket(key(vals[wanted[k] as usize])), i as usize);
        ranks[k] = below_root[b] as f64
            + if count[b] <= q {
                mid(count[b])
            } else if cnt[i] <= q {
                below_sub[i] as f64 + mid(cnt[i])
            } else if !mixed[i] {
                below_sub[i] as f64 + (c + 1) as f64
            } else {
                sorted_parts.entry(i).or_default();
                below_sub[i] as f64 // the place within is added below
            };
    }
    if !sorted_parts.is_empty() {
        // Heavy sub-buckets of several keys (rare): their elements sorted by (key, position).
        for (j, &v) in vals.iter().enumerate() {
            let k = key(v);
            if let Some(part) = sorted_parts.get_mut(&slot(k)) {
                part.push((k, j as u64));
            }
        }
        sorted_parts.values_mut().for_each(|p| p.sort_unstable());
        for (k, &(i, _)) in seen.iter().enumerate() {
            if let Some(part) = sorted_parts.get(&(i as usize)) {
                let j = wanted[k];
                let place = part.partition_point(|&x| x < (key(vals[j as usize]), j));
                ranks[k] += (place + 1) as f64;
            }
        }
    }
    Some(ranks)
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
        let mut kept = 0;
        for _ in 0..7 {
            let t = std::time::Instant::now();
            let bits = super::della_bits(&vals, key, &d);
            best = best.min(t.elapsed().as_secs_f64());
            kept = bits.iter().map(|w| w.count_ones()).sum::<u32>();
        }
        eprintln!(
            "della_bits {:.2} ns/el over {} ({kept} kept)",
            best / vals.len() as f64 * 1e9,
            vals.len()
        );
    }
}
