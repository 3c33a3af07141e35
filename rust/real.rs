//! The working precision of the robust merges: their element-wise loops are written once over
//! [`Real`] and run as f64 (the default) or f32 (`precision = "f32"`: half the bytes per value,
//! twice the SIMD lanes). Whatever the precision, what feeds a scalar step (the Gram product,
//! Weiszfeld, model stock factors, the isotropic SVD) is computed in f64.

use std::cmp::Ordering;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Sub};

use crate::dtype::Dtype;
use crate::kernels;

/// f32 or f64.
pub trait Real:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + MulAssign
    + DivAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;

    /// The nearest value (an f64 parameter such as a coefficient or a weight).
    fn from_f64(x: f64) -> Self;
    /// Exact.
    fn to_f64(self) -> f64;
    /// NaN?
    fn is_nan(self) -> bool;
    /// Neither NaN nor infinite?
    fn is_finite(self) -> bool;
    /// `|x|`.
    fn abs(self) -> Self;
    /// 1 for bit 1, 0 for bit 0, built from the bits (an integer multiply): a select here let
    /// the compiler turn `x *= mask` into masked stores, microcoded on AMD.
    fn one_if(bit: u64) -> Self;
    /// IEEE total order.
    fn total_cmp(&self, other: &Self) -> Ordering;
    /// The bits of `|x|` as an f64 (monotone in `|x|`): DELLA rank keys, so f32 and f64 values
    /// that are equal get equal keys, and both executors draw the same masks.
    #[inline(always)]
    fn rank_key(self) -> u64 {
        self.to_f64().abs().to_bits()
    }
    /// `dst[i] = src[i]` from stored bytes of `dtype` (exact, or rounded to f32 for an f64
    /// source in f32 precision).
    fn load(dst: &mut [Self], src: &[u8], dtype: Dtype);
    /// `out = round(acc)` into `dtype`, correctly rounded once; `acc` may be overwritten.
    fn finish(acc: &mut [Self], out: &mut [u8], dtype: Dtype);
    /// The Gram matrix `P P^T` of `np` points of `len` elements (point-major), products and sums
    /// in f64 whatever the precision.
    fn gram(pts: &[Self], np: usize, len: usize) -> Vec<f64>;
}

/// Points per block of the Gram product (see `gram` for f64).
const GRAM_PART: usize = 32;

/// The methods f32 and f64 share.
macro_rules! common {
    ($t:ty) => {
        #[inline(always)]
        fn from_f64(x: f64) -> $t {
            x as $t
        }
        #[inline(always)]
        fn to_f64(self) -> f64 {
            self as f64
        }
        #[inline(always)]
        fn is_nan(self) -> bool {
            <$t>::is_nan(self)
        }
        #[inline(always)]
        fn is_finite(self) -> bool {
            <$t>::is_finite(self)
        }
        #[inline(always)]
        fn abs(self) -> $t {
            <$t>::abs(self)
        }
        #[inline(always)]
        fn total_cmp(&self, other: &$t) -> Ordering {
            <$t>::total_cmp(self, other)
        }
    };
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;

    common!(f64);

    /// Up to 8 points with AVX-512: [`gram_avx512`]. Else blocks of up to [`GRAM_PART`] points:
    /// the GEMM of each block pair on or above the diagonal, the rest mirrored (the matrix is symmetric; a product's terms commute, so a
    /// mirrored entry has the bits the GEMM would give it). At 64 points that is 3 of 4 blocks.
    fn gram(pts: &[f64], np: usize, len: usize) -> Vec<f64> {
        #[cfg(target_arch = "x86_64")]
        if np <= 8 && len > 0 && kernels::Level::detect().has_avx512() {
            return gram_few(pts, np, len);
        }
        let mut g = vec![0f64; np * np];
        if len == 0 {
            return g;
        }
        for i0 in (0..np).step_by(GRAM_PART) {
            let m = GRAM_PART.min(np - i0);
            for j0 in (i0..np).step_by(GRAM_PART) {
                let n = GRAM_PART.min(np - j0);
                // SAFETY: `pts` is point-major (np x len, row stride len): rows i0..i0+m are the
                // left operand, rows j0..j0+n read as their transpose (len x n, column stride
                // len) the right one; the product is the m x n block of `g` (row stride np) at
                // (i0, j0). All within their slices; `g` does not alias `pts`.
                unsafe {
                    matrixmultiply::dgemm(
                        m,
                        len,
                        n,
                        1.0,
                        pts.as_ptr().add(i0 * len),
                        len as isize,
                        1,
                        pts.as_ptr().add(j0 * len),
                        1,
                        len as isize,
                        0.0,
                        g.as_mut_ptr().add(i0 * np + j0),
                        np as isize,
                        1,
                    );
                }
            }
        }
        for i in 0..np {
            for j in 0..i {
                g[i * np + j] = g[j * np + i];
            }
        }
        g
    }

    #[inline(always)]
    fn one_if(bit: u64) -> f64 {
        f64::from_bits(bit * 1f64.to_bits())
    }

    fn load(dst: &mut [f64], src: &[u8], dtype: Dtype) {
        kernels::load_f64_slice(dst, src, dtype)
    }

    fn finish(acc: &mut [f64], out: &mut [u8], dtype: Dtype) {
        if dtype == Dtype::F16 {
            kernels::finish_f64_to_f16(acc, out);
        } else {
            kernels::finish_f64(acc, None, out, dtype);
        }
    }
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;

    common!(f32);

    /// dgemm over the block widened: sgemm's packing of this layout took several times the
    /// product itself (10x, or 2x with an element-major copy), and f64 sums keep the
    /// whole-tensor model stock's cosines as exact as in f64 precision (two opposite points: -1).
    fn gram(pts: &[f32], np: usize, len: usize) -> Vec<f64> {
        thread_local! {
            /// The widened block, kept for the thread's life (a fresh 512 KB per block faults).
            static WIDE: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        WIDE.with(|w| {
            let mut wide = w.borrow_mut();
            wide.clear();
            wide.extend(pts.iter().map(|&x| x as f64));
            f64::gram(&wide, np, len)
        })
    }

    #[inline(always)]
    fn one_if(bit: u64) -> f32 {
        f32::from_bits(bit as u32 * 1f32.to_bits())
    }

    fn load(dst: &mut [f32], src: &[u8], dtype: Dtype) {
        kernels::load_f32_slice(dst, src, dtype)
    }

    fn finish(acc: &mut [f32], out: &mut [u8], dtype: Dtype) {
        kernels::finish(kernels::Level::detect(), acc, None, out, dtype)
    }
}

/// The Gram matrix of up to 8 points with AVX-512, no packing: at this size the GEMM's packing
/// of both operands took twice its product (a DGMLA N=8 run spent 8% in the two).
#[cfg(target_arch = "x86_64")]
fn gram_few(pts: &[f64], np: usize, len: usize) -> Vec<f64> {
    assert!(np <= 8 && pts.len() >= np * len);
    macro_rules! by_count {
        ($($n:literal)*) => {
            match np {
                // SAFETY: AVX-512F was detected by the caller; `pts` holds np rows of len.
                $($n => unsafe { gram_avx512::<$n>(pts, len) },)*
                _ => Vec::new(),
            }
        };
    }
    by_count!(0 1 2 3 4 5 6 7 8)
}

/// Rows two at a time against every row on or after the first: 2N accumulators of 8 lanes,
/// each lane a sum over the elements of its residue mod 8, in element order, added up lane by
/// lane at the end. The upper triangle is computed and mirrored: exactly symmetric.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gram_avx512<const N: usize>(pts: &[f64], len: usize) -> Vec<f64> {
    use std::arch::x86_64::*;
    let mut g = vec![0f64; N * N];
    let body = len - len % 8;
    let row = |r: usize| &pts[r * len..(r + 1) * len];
    let mut i = 0;
    while i < N {
        // (a lone last row is its own pair)
        let i1 = (i + 1).min(N - 1);
        let (r0, r1) = (row(i), row(i1));
        let mut a0 = [_mm512_setzero_pd(); N];
        let mut a1 = [_mm512_setzero_pd(); N];
        let mut e = 0;
        while e < body {
            // SAFETY: e + 8 <= len: every load is within its row.
            unsafe {
                let x0 = _mm512_loadu_pd(r0.as_ptr().add(e));
                let x1 = _mm512_loadu_pd(r1.as_ptr().add(e));
                for j in 0..N {
                    if j >= i {
                        let y = _mm512_loadu_pd(pts.as_ptr().add(j * len + e));
                        a0[j] = _mm512_fmadd_pd(x0, y, a0[j]);
                        a1[j] = _mm512_fmadd_pd(x1, y, a1[j]);
                    }
                }
            }
            e += 8;
        }
        for j in i..N {
            let rj = row(j);
            let (mut s0, mut s1) = (_mm512_reduce_add_pd(a0[j]), _mm512_reduce_add_pd(a1[j]));
            for t in body..len {
                s0 += r0[t] * rj[t];
                s1 += r1[t] * rj[t];
            }
            g[i * N + j] = s0;
            g[i1 * N + j] = s1;
        }
        i += 2;
    }
    for i in 0..N {
        for j in 0..i {
            g[i * N + j] = g[j * N + i];
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_in_both_precisions_matches_direct_sums() {
        for (np, len) in [(3, 37), (70, 5), (1, 9), (2, 8), (5, 7), (7, 1000), (8, 8195), (9, 33)] {
            check_gram(np, len);
        }
    }

    fn check_gram(np: usize, len: usize) {
        let p64: Vec<f64> = (0..np * len).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        let p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
        let g64 = f64::gram(&p64, np, len);
        let g32 = f32::gram(&p32, np, len);
        for a in 0..np {
            for b in 0..np {
                let want: f64 = (0..len).map(|e| p64[a * len + e] * p64[b * len + e]).sum();
                assert!((g64[a * np + b] - want).abs() <= 1e-12 * want.abs().max(1.0));
                assert!((g32[a * np + b] - want).abs() <= 1e-5 * want.abs().max(1.0));
                assert_eq!(g64[a * np + b].to_bits(), g64[b * np + a].to_bits(), "symmetric");
            }
        }
    }

    #[test]
    fn blocked_gram_has_the_bits_of_one_product() {
        let (np, len) = (70, 301);
        let p: Vec<f64> = (0..np * len)
            .map(|i| (((i * 7919) % 1013) as f64 / 500.0 - 1.0) * 1.1f64.powi((i % 7) as i32))
            .collect();
        let mut full = vec![0f64; np * np];
        // SAFETY: as in `gram`, one product over all points.
        unsafe {
            matrixmultiply::dgemm(
                np,
                len,
                np,
                1.0,
                p.as_ptr(),
                len as isize,
                1,
                p.as_ptr(),
                1,
                len as isize,
                0.0,
                full.as_mut_ptr(),
                np as isize,
                1,
            );
        }
        let g = f64::gram(&p, np, len);
        assert!(g.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn rank_keys_agree_across_precisions() {
        for x in [0.0f32, -0.0, 1.5e-8, -3.25, 65504.0] {
            assert_eq!(x.rank_key(), (x as f64).rank_key());
        }
        assert!(2.0f32.rank_key() > 1.0f32.rank_key());
    }
}
