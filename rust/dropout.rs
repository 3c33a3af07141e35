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

/// The uniform 32-bit draw of element `idx` in stream `k`.
#[inline(always)]
pub fn draw(k: [u32; 3], idx: u64) -> u32 {
    let x = lowbias32(idx as u32 ^ k[0]);
    let x = lowbias32(x ^ (idx >> 32) as u32 ^ k[1]);
    lowbias32(x ^ k[2])
}

const TWO32: f64 = 4_294_967_296.0;

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

/// The keep mask (1.0 / 0.0) of one point's elements `start..start + vals.len()` into `out`.
pub fn mask(out: &mut Vec<f64>, vals: &[f64], start: usize, key: [u32; 3], d: &Dropout, ranks: Ranks<'_>) {
    out.clear();
    out.resize(vals.len(), 0.0);
    let q0 = (1.0 - d.p).clamp(0.0, 1.0) * TWO32;
    let ranks = match ranks {
        _ if d.della_eps == 0.0 => Ranks::None,
        Ranks::Table(t) if t.nan => Ranks::None,
        r => r,
    };
    match ranks {
        Ranks::None => {
            for (e, m) in out.iter_mut().enumerate() {
                *m = if (draw(key, (start + e) as u64) as f64) < q0 {
                    1.0
                } else {
                    0.0
                };
            }
        }
        Ranks::Table(t) => {
            // Only draws inside [lo, hi) depend on the rank: most elements skip the lookup.
            let half = d.della_eps.abs() / 2.0;
            let lo = (1.0 - d.p - half).clamp(0.0, 1.0) * TWO32;
            let hi = (1.0 - d.p + half).clamp(0.0, 1.0) * TWO32;
            let n = t.n as f64;
            for (e, (m, &v)) in out.iter_mut().zip(vals).enumerate() {
                let j = (start + e) as u64;
                let u = draw(key, j) as f64;
                let keep = u < lo || (u < hi && u < d.q(t.rank(v, j), n) * TWO32);
                *m = if keep { 1.0 } else { 0.0 };
            }
        }
        Ranks::Rows(row) => {
            let row = row.max(1);
            let mut order: Vec<(u64, u32)> = Vec::with_capacity(row);
            let mut rank = vec![0f64; row];
            for (r, (ms, vs)) in out.chunks_mut(row).zip(vals.chunks(row)).enumerate() {
                let nan = vs.iter().any(|v| v.is_nan());
                if !nan {
                    order.clear();
                    order.extend(vs.iter().enumerate().map(|(i, v)| (v.abs().to_bits(), i as u32)));
                    order.sort_unstable();
                    for (pos, &(_, i)) in order.iter().enumerate() {
                        rank[i as usize] = (pos + 1) as f64;
                    }
                }
                let n = vs.len() as f64;
                for (i, m) in ms.iter_mut().enumerate() {
                    let j = (start + r * row + i) as u64;
                    let q = if nan { (1.0 - d.p).clamp(0.0, 1.0) } else { d.q(rank[i], n) };
                    *m = if (draw(key, j) as f64) < q * TWO32 { 1.0 } else { 0.0 };
                }
            }
        }
    }
}

/// Buckets of the first level of a [`RankTable`] at most (a table stays in the L2 cache).
const BUCKETS: usize = 1 << 16;

/// Approximate ordinal ranks of `(|v_j|, j)` within one tensor of one model, built in one go from
/// the whole tensor and then queried element by element.
///
/// Keys are the bits of `|v|` (monotone for non-negative floats), bucketed by their top bits
/// (at most 65536 buckets over the tensor's key range). A bucket holding at most `T` elements is
/// answered by its midpoint; a heavier one (repeated values, dense ranges) keeps every `q`-th
/// element of its exact `(key, position)` order, found by binary search. Both errors are at most
/// `T / 2` ranks, with `T = q = 1.8e-4 n / |eps|`, so the keep probability is within 0.9e-4 of the
/// exact one. Memory: the buckets plus n / q samples.
#[derive(Debug, Clone)]
pub struct RankTable {
    n: u64,
    nan: bool,
    shift: u32,
    base: u64,
    /// Elements below each bucket (prefix sums; one more entry than buckets).
    below: Vec<u64>,
    /// Per bucket: index into `heavy`, or `u32::MAX` for a light bucket.
    which: Vec<u32>,
    /// Per heavy bucket: `(key, position)` of its elements at within-bucket ranks 0, q, 2q, ...
    heavy: Vec<Vec<(u64, u64)>>,
    q: u64,
}

impl RankTable {
    /// The table of one tensor's values (one model's points), for a DELLA weight `della_eps`.
    pub fn build(vals: &[f64], della_eps: f64) -> RankTable {
        let n = vals.len();
        let mut t = RankTable {
            n: n as u64,
            nan: false,
            shift: 0,
            base: 0,
            below: vec![0, n as u64],
            which: vec![u32::MAX],
            heavy: Vec::new(),
            q: 1,
        };
        if n == 0 {
            return t;
        }
        if vals.iter().any(|v| v.is_nan()) {
            t.nan = true;
            return t;
        }
        let key = |v: f64| v.abs().to_bits();
        let (kmin, kmax) = vals
            .iter()
            .fold((u64::MAX, 0u64), |(lo, hi), &v| (lo.min(key(v)), hi.max(key(v))));
        let cap = n.clamp(256, BUCKETS) as u64;
        while (kmax >> t.shift) - (kmin >> t.shift) >= cap {
            t.shift += 1;
        }
        t.base = kmin >> t.shift;
        let nb = ((kmax >> t.shift) - t.base + 1) as usize;
        let mut count = vec![0u64; nb];
        for &v in vals {
            count[((key(v) >> t.shift) - t.base) as usize] += 1;
        }
        t.below = Vec::with_capacity(nb + 1);
        t.below.push(0);
        for c in &count {
            let last = *t.below.last().expect("non-empty");
            t.below.push(last + c);
        }
        let limit = ((1.8 * TOL * n as f64 / della_eps.abs().max(1e-300)).floor() as u64).max(1);
        t.q = limit;
        t.which = vec![u32::MAX; nb];
        let mut heavy_buckets = Vec::new();
        for (b, &c) in count.iter().enumerate() {
            if c > limit {
                t.which[b] = heavy_buckets.len() as u32;
                heavy_buckets.push(b);
            }
        }
        if heavy_buckets.is_empty() {
            return t;
        }
        // One scan in position order: a bucket of one repeated key is sampled directly (its
        // order is the position order); the others are gathered and sorted.
        let h = heavy_buckets.len();
        let (mut first, mut multi, mut seen) = (vec![u64::MAX; h], vec![false; h], vec![0u64; h]);
        t.heavy = vec![Vec::new(); h];
        for (j, &v) in vals.iter().enumerate() {
            let k = key(v);
            let w = t.which[((k >> t.shift) - t.base) as usize];
            if w == u32::MAX {
                continue;
            }
            let w = w as usize;
            if first[w] == u64::MAX {
                first[w] = k;
            }
            multi[w] |= k != first[w];
            if seen[w] % t.q == 0 {
                t.heavy[w].push((k, j as u64));
            }
            seen[w] += 1;
        }
        if multi.iter().any(|&m| m) {
            let mut all: Vec<Vec<(u64, u64)>> = (0..h)
                .map(|w| {
                    if multi[w] {
                        Vec::with_capacity(seen[w] as usize)
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            for (j, &v) in vals.iter().enumerate() {
                let k = key(v);
                let w = t.which[((k >> t.shift) - t.base) as usize];
                if w != u32::MAX && multi[w as usize] {
                    all[w as usize].push((k, j as u64));
                }
            }
            for (w, mut pairs) in all.into_iter().enumerate() {
                if multi[w] {
                    pairs.sort_unstable();
                    t.heavy[w] = pairs.into_iter().step_by(t.q as usize).collect();
                }
            }
        }
        t
    }

    /// Whether the tensor held a NaN (then every rank term is 0).
    pub fn has_nan(&self) -> bool {
        self.nan
    }

    /// The estimated ordinal rank (1..n) of element `j`, whose value is `v`.
    pub fn rank(&self, v: f64, j: u64) -> f64 {
        let k = v.abs().to_bits();
        let nb = self.which.len();
        let b = ((k >> self.shift).saturating_sub(self.base) as usize).min(nb - 1);
        let count = self.below[b + 1] - self.below[b];
        let within = match self.which[b] {
            u32::MAX => count.saturating_sub(1) as f64 / 2.0,
            w => {
                let s = &self.heavy[w as usize];
                let m = s.partition_point(|&p| p < (k, j)) as u64;
                if m == 0 {
                    0.0
                } else {
                    (((m - 1) * self.q) as f64 + (self.q + 1) as f64 / 2.0).min(count.saturating_sub(1) as f64)
                }
            }
        };
        self.below[b] as f64 + within + 1.0
    }

    /// Bytes this table holds (for the memory estimate).
    pub fn bytes(&self) -> usize {
        self.below.len() * 8 + self.which.len() * 4 + self.heavy.iter().map(|h| h.len() * 16).sum::<usize>()
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
