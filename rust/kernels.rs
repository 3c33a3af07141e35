//! Convert-and-accumulate kernels. The engine calls these on cache-sized chunks.
//!
//! Semantics (identical for every level, and for the CUDA executor):
//! `acc = acc + f32(x)` or, weighted, `acc = acc + f32(w * f32(x))`, then one IEEE division by N
//! (uniform) and round-to-nearest-even into the output dtype. No FMA, no reassociation: each
//! element's result depends only on its own inputs in plan order, so threads never change bits.
//!
//! Levels are chosen once at run time: AVX-512 (F + F16 conversion), AVX2 + F16C, or scalar.

use std::sync::OnceLock;

use crate::dtype::Dtype;

/// Which implementation runs. Only [`Level::detect`] and [`Level::available`] make one, so safe
/// code can never pick an instruction set this CPU lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level(Imp);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Imp {
    Scalar,
    Avx2,
    Avx512,
}

impl Level {
    const SCALAR: Level = Level(Imp::Scalar);
    #[cfg(target_arch = "x86_64")]
    const AVX2: Level = Level(Imp::Avx2);
    #[cfg(target_arch = "x86_64")]
    const AVX512: Level = Level(Imp::Avx512);

    /// Whether code compiled for AVX2 may run at this level (the robust loops and mask draws,
    /// which have no AVX-512 builds).
    pub fn has_avx2(self) -> bool {
        self != Level::SCALAR
    }

    /// Whether this is the AVX-512 level (F; callers needing more subsets check them).
    pub fn has_avx512(self) -> bool {
        self.0 == Imp::Avx512
    }

    /// The best level this CPU supports (cached). `ASTOLFOMIX_KERNEL=scalar|avx2|avx512` caps it.
    pub fn detect() -> Level {
        static L: OnceLock<Level> = OnceLock::new();
        *L.get_or_init(|| {
            let all = Level::available();
            let best = all.last().copied().unwrap_or(Level::SCALAR);
            match std::env::var("ASTOLFOMIX_KERNEL").as_deref() {
                Ok("scalar") => Level::SCALAR,
                Ok("avx2") => all.get(1).copied().unwrap_or(best),
                _ => best,
            }
        })
    }

    /// Every level this CPU can run, scalar first.
    pub fn available() -> Vec<Level> {
        #[allow(unused_mut)]
        let mut v = vec![Level::SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                v.push(Level::AVX2);
                if is_x86_feature_detected!("avx512f") {
                    v.push(Level::AVX512);
                }
            }
        }
        v
    }

    /// The portable scalar level (always available).
    pub fn scalar() -> Level {
        Level::SCALAR
    }

    /// A short name: `scalar`, `avx2+f16c`, `avx512f`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Imp::Scalar => "scalar",
            Imp::Avx2 => "avx2+f16c",
            Imp::Avx512 => "avx512f",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Minifloat formats: exact decode, and correctly rounded (RNE) encode from f64.

/// A small IEEE-like binary float format.
#[derive(Clone, Copy)]
struct Mini {
    exp_bits: u32,
    man_bits: u32,
    /// `fn` formats (F8_E4M3) have no infinity; all-ones is NaN and overflow becomes NaN.
    finite_only: bool,
}

const F16: Mini = Mini {
    exp_bits: 5,
    man_bits: 10,
    finite_only: false,
};
const BF16: Mini = Mini {
    exp_bits: 8,
    man_bits: 7,
    finite_only: false,
};
const E5M2: Mini = Mini {
    exp_bits: 5,
    man_bits: 2,
    finite_only: false,
};
const E4M3: Mini = Mini {
    exp_bits: 4,
    man_bits: 3,
    finite_only: true,
};

fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Mini {
    fn bias(self) -> i32 {
        (1 << (self.exp_bits - 1)) - 1
    }
    fn sign_bit(self) -> u32 {
        1 << (self.exp_bits + self.man_bits)
    }
    fn max_exp_field(self) -> u32 {
        (1 << self.exp_bits) - 1
    }
    fn nan(self) -> u32 {
        if self.finite_only {
            (self.max_exp_field() << self.man_bits) | ((1 << self.man_bits) - 1)
        } else {
            (self.max_exp_field() << self.man_bits) | (1 << (self.man_bits - 1))
        }
    }
    fn overflow(self) -> u32 {
        if self.finite_only {
            self.nan()
        } else {
            self.max_exp_field() << self.man_bits
        }
    }

    fn decode(self, bits: u32) -> f64 {
        let sign = if bits & self.sign_bit() != 0 { -1.0 } else { 1.0 };
        let e = (bits >> self.man_bits) & self.max_exp_field();
        let m = bits & ((1 << self.man_bits) - 1);
        let top = e == self.max_exp_field();
        if top && !self.finite_only {
            return if m == 0 {
                sign * f64::INFINITY
            } else {
                f64::NAN.copysign(sign)
            };
        }
        if top && self.finite_only && m == (1 << self.man_bits) - 1 {
            return f64::NAN.copysign(sign);
        }
        let v = if e == 0 {
            m as f64 * pow2(1 - self.bias() - self.man_bits as i32)
        } else {
            (m as f64 + (1u64 << self.man_bits) as f64) * pow2(e as i32 - self.bias() - self.man_bits as i32)
        };
        sign * v
    }

    /// Round-to-nearest-even of `x` into this format: scale by the format's quantum at x's
    /// binade (exact in f64), round the integer, re-encode.
    fn encode(self, x: f64) -> u32 {
        let sign = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        if x.is_nan() {
            return sign | self.nan();
        }
        let a = x.abs();
        if a.is_infinite() {
            return sign | self.overflow();
        }
        if a < pow2(-1000) {
            // Far below half the smallest subnormal of every format here.
            return sign;
        }
        let e = ((a.to_bits() >> 52) as i32) - 1023;
        let min_e = 1 - self.bias();
        let mut q = e.max(min_e) - self.man_bits as i32;
        let mut r = (a * pow2(-q)).round_ties_even() as u64;
        if r >= 1u64 << (self.man_bits + 1) {
            r >>= 1;
            q += 1;
        }
        let bits = if r < 1u64 << self.man_bits {
            r as u32 // subnormal or zero
        } else {
            let ef = (q + self.man_bits as i32 + self.bias()) as u32;
            let man = (r - (1u64 << self.man_bits)) as u32;
            let limit = if self.finite_only {
                self.max_exp_field()
            } else {
                self.max_exp_field() - 1
            };
            if ef > limit || (self.finite_only && ef == limit && man == (1 << self.man_bits) - 1) {
                return sign | self.overflow();
            }
            (ef << self.man_bits) | man
        };
        sign | bits
    }
}

fn f8_table(m: Mini) -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = m.decode(i as u32) as f32;
    }
    t
}

fn e4m3_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| f8_table(E4M3))
}

fn e5m2_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| f8_table(E5M2))
}

// ---------------------------------------------------------------------------------------------
// Scalar element conversions.

/// Exact f16 -> f32 without branches on the common path (the compiler can vectorize it), for
/// CPUs without F16C: normals rebias the exponent, subnormals go through one exact subtraction.
#[inline]
fn f16_to_f32(h: u16) -> f32 {
    const MAGIC: f32 = f32::from_bits(113 << 23); // 2^-14
    const EXP: u32 = 0x7c00 << 13;
    let body = ((h as u32) & 0x7fff) << 13;
    let exp = body & EXP;
    let mut o = body + ((127 - 15) << 23);
    if exp == EXP {
        o += (128 - 16) << 23; // Inf / NaN
    } else if exp == 0 {
        o = (f32::from_bits(o + (1 << 23)) - MAGIC).to_bits(); // zero / subnormal
    }
    f32::from_bits(o | (((h as u32) & 0x8000) << 16))
}

/// f32 -> f16, round to nearest even, NaN quieted with its top payload bits (as F16C does).
#[inline]
fn f32_to_f16(x: f32) -> u16 {
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: f32 = f32::from_bits(((127 - 15) + (23 - 10) + 1) << 23);
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = bits & 0x7fff_ffff;
    let o = if a >= F16_MAX {
        if a > 0x7f80_0000 {
            0x7e00 | ((a & 0x7f_ffff) >> 13) as u16 // NaN
        } else {
            0x7c00 // overflow to Inf
        }
    } else if a < 113 << 23 {
        // Subnormal or zero: one float addition does the rounding.
        (f32::from_bits(a) + DENORM_MAGIC)
            .to_bits()
            .wrapping_sub(DENORM_MAGIC.to_bits()) as u16
    } else {
        let odd = (a >> 13) & 1;
        ((a.wrapping_add(((15 - 127) << 23) as u32).wrapping_add(0xfff + odd)) >> 13) as u16
    };
    o | sign
}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Element `i` of `src` (stored as `dtype`) as f32. f64 rounds to nearest even.
#[inline]
fn load_f32(src: &[u8], dtype: Dtype, i: usize) -> f32 {
    match dtype {
        Dtype::F16 => f16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
        Dtype::BF16 => bf16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
        Dtype::F32 => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        Dtype::F64 => f64::from_le_bytes(src[8 * i..8 * i + 8].try_into().expect("8 bytes")) as f32,
        Dtype::F8_E4M3 => e4m3_table()[src[i] as usize],
        Dtype::F8_E5M2 => e5m2_table()[src[i] as usize],
        d => unreachable!("{d} is not averageable; plans reject it"),
    }
}

/// Element `i` as f64, exactly.
#[inline]
fn load_f64(src: &[u8], dtype: Dtype, i: usize) -> f64 {
    match dtype {
        Dtype::F64 => f64::from_le_bytes(src[8 * i..8 * i + 8].try_into().expect("8 bytes")),
        _ => load_f32(src, dtype, i) as f64,
    }
}

#[inline]
fn store_f32(out: &mut [u8], dtype: Dtype, i: usize, x: f32) {
    match dtype {
        Dtype::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f32_to_f16(x).to_le_bytes()),
        Dtype::BF16 => out[2 * i..2 * i + 2].copy_from_slice(&f32_to_bf16(x).to_le_bytes()),
        Dtype::F32 => out[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
        _ => store_f64(out, dtype, i, x as f64),
    }
}

#[inline]
fn store_f64(out: &mut [u8], dtype: Dtype, i: usize, x: f64) {
    match dtype {
        Dtype::F64 => out[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes()),
        Dtype::F32 => out[4 * i..4 * i + 4].copy_from_slice(&(x as f32).to_le_bytes()),
        Dtype::F16 => out[2 * i..2 * i + 2].copy_from_slice(&(F16.encode(x) as u16).to_le_bytes()),
        Dtype::BF16 => out[2 * i..2 * i + 2].copy_from_slice(&(BF16.encode(x) as u16).to_le_bytes()),
        Dtype::F8_E4M3 => out[i] = E4M3.encode(x) as u8,
        Dtype::F8_E5M2 => out[i] = E5M2.encode(x) as u8,
        d => unreachable!("{d} is not a float output; plans reject it"),
    }
}

// ---------------------------------------------------------------------------------------------
// Public chunk kernels.

/// `acc[i] = acc[i] + f32(src[i])`, or `acc[i] + f32(w * f32(src[i]))` when weighted.
///
/// # Panics
/// If `src` does not hold exactly `acc.len()` elements of `dtype` (a check that stays in release
/// builds: the SIMD paths read by pointer).
pub fn accumulate(level: Level, acc: &mut [f32], src: &[u8], dtype: Dtype, weight: Option<f32>) {
    assert_eq!(
        src.len(),
        acc.len() * dtype.size(),
        "accumulate: source length does not match"
    );
    let done = match level.0 {
        #[cfg(target_arch = "x86_64")]
        Imp::Avx512 => unsafe {
            // SAFETY: an Avx512 level only comes from detection of avx512f, avx2 and f16c, and
            // the lengths were checked above.
            x86::accumulate_avx512(acc, src, dtype, weight)
        },
        #[cfg(target_arch = "x86_64")]
        Imp::Avx2 => unsafe {
            // SAFETY: an Avx2 level only comes from detection of avx2 and f16c; lengths checked.
            x86::accumulate_avx2(acc, src, dtype, weight)
        },
        _ => 0,
    };
    let (acc, src) = (&mut acc[done..], &src[done * dtype.size()..]);
    macro_rules! add {
        ($width:expr, $conv:expr) => {{
            let it = acc.iter_mut().zip(src.chunks_exact($width));
            match weight {
                None => it.for_each(|(a, c)| *a += $conv(c)),
                Some(w) => it.for_each(|(a, c)| {
                    let p = w * $conv(c);
                    *a += p
                }),
            }
        }};
    }
    match dtype {
        Dtype::F16 => add!(2, |c: &[u8]| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        Dtype::BF16 => add!(2, |c: &[u8]| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        Dtype::F32 => add!(4, |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        _ => add!(dtype.size(), |c: &[u8]| load_f32(c, dtype, 0)),
    }
}

/// `out[i] = round(acc[i] / divisor)` (or `round(acc[i])`) into `out_dtype`. Overwrites `acc`.
///
/// # Panics
/// If `out` does not hold exactly `acc.len()` elements of `out_dtype`.
pub fn finish(level: Level, acc: &mut [f32], divisor: Option<f32>, out: &mut [u8], out_dtype: Dtype) {
    assert_eq!(
        out.len(),
        acc.len() * out_dtype.size(),
        "finish: output length does not match"
    );
    let done = match level.0 {
        #[cfg(target_arch = "x86_64")]
        Imp::Avx2 | Imp::Avx512 => unsafe {
            // SAFETY: both levels only come from detection of avx2 and f16c; lengths checked.
            x86::finish_avx2(acc, divisor, out, out_dtype)
        },
        _ => 0,
    };
    for (i, &a) in acc.iter().enumerate().skip(done) {
        let x = match divisor {
            Some(n) => a / n,
            None => a,
        };
        store_f32(out, out_dtype, i, x);
    }
}

/// Sets `acc[i] = f32(src[i])` (a conversion, not `0 + x`: keeps -0.0).
pub fn load(acc: &mut [f32], src: &[u8], dtype: Dtype) {
    for (i, a) in acc.iter_mut().enumerate() {
        *a = load_f32(src, dtype, i);
    }
}

/// f64 accumulation: `acc = acc + f64(x)` or `acc + w * f64(x)`.
pub fn accumulate_f64(acc: &mut [f64], src: &[u8], dtype: Dtype, weight: Option<f64>) {
    match weight {
        None => acc.iter_mut().enumerate().for_each(|(i, a)| *a += load_f64(src, dtype, i)),
        Some(w) => acc.iter_mut().enumerate().for_each(|(i, a)| {
            let p = w * load_f64(src, dtype, i);
            *a += p
        }),
    }
}

/// `convert(f16 values, acc piece)` over `src`'s f16 values: in place where `src` is 2-byte
/// aligned, else in pieces of 4096 copied into an aligned buffer first (inputs may start at any
/// byte).
fn f16_pieces<T>(acc: &mut [T], src: &[u8], mut convert: impl FnMut(&[half::f16], &mut [T])) {
    use half::slice::HalfBitsSliceExt;
    #[cfg(target_endian = "little")]
    {
        // SAFETY: every bit pattern is a valid u16; `align_to` only yields the aligned middle.
        let (head, mid, tail) = unsafe { src.align_to::<u16>() };
        if head.is_empty() && tail.is_empty() {
            // A 2-byte aligned source (a map of a file whose tensors start at even offsets, as
            // safetensors writers pad them): converted in place, no copy into a bits buffer.
            convert(mid.reinterpret_cast::<half::f16>(), acc);
            return;
        }
    }
    let mut bits = [0u16; 4096];
    for (a, c) in acc.chunks_mut(4096).zip(src.chunks(8192)) {
        let b = &mut bits[..a.len()];
        b.iter_mut()
            .zip(c.chunks_exact(2))
            .for_each(|(x, y)| *x = u16::from_le_bytes([y[0], y[1]]));
        convert(b.reinterpret_cast::<half::f16>(), a);
    }
}

/// Sets `acc[i] = f64(src[i])` exactly. F16 goes through F16C 8 values at a time straight from
/// the (possibly unaligned) bytes where the CPU has it, else `half`'s slice conversion: the
/// robust merges convert every input element to f64 in each pass.
pub fn load_f64_slice(acc: &mut [f64], src: &[u8], dtype: Dtype) {
    assert_eq!(
        src.len(),
        acc.len() * dtype.size(),
        "load_f64_slice: source length does not match"
    );
    match dtype {
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if Level::detect().has_avx2() {
                // SAFETY: the level is AVX2 or above only where the CPU has AVX2 and F16C.
                unsafe { x86f16::to_f64(acc, src) };
                return;
            }
            use half::slice::HalfFloatSliceExt;
            f16_pieces(acc, src, |h, a| h.convert_to_f64_slice(a));
        }
        Dtype::F32 => acc
            .iter_mut()
            .zip(src.chunks_exact(4))
            .for_each(|(a, c)| *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        Dtype::F64 => acc
            .iter_mut()
            .zip(src.chunks_exact(8))
            .for_each(|(a, c)| *a = f64::from_le_bytes(c.try_into().expect("8 bytes"))),
        _ => acc.iter_mut().enumerate().for_each(|(i, a)| *a = load_f64(src, dtype, i)),
    }
}

/// Sets `acc[i] = f32(src[i])` (exact, except an f64 source, which is rounded to nearest): the
/// robust merges' f32 precision. F16 goes through F16C where present (as [`load_f64_slice`]).
pub fn load_f32_slice(acc: &mut [f32], src: &[u8], dtype: Dtype) {
    assert_eq!(
        src.len(),
        acc.len() * dtype.size(),
        "load_f32_slice: source length does not match"
    );
    match dtype {
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if Level::detect().has_avx2() {
                // SAFETY: the level is AVX2 or above only where the CPU has AVX2 and F16C.
                unsafe { x86f16::to_f32(acc, src) };
                return;
            }
            use half::slice::HalfFloatSliceExt;
            f16_pieces(acc, src, |h, a| h.convert_to_f32_slice(a));
        }
        Dtype::F32 => acc
            .iter_mut()
            .zip(src.chunks_exact(4))
            .for_each(|(a, c)| *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        _ => load(acc, src, dtype),
    }
}

/// f16 to f32/f64 with F16C, 8 values per step from unaligned bytes: exact conversions (as
/// `half`'s, which calls the same instructions one 8-value call at a time: 13% of a DGMLA run).
#[cfg(target_arch = "x86_64")]
mod x86f16 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn to_f64(acc: &mut [f64], src: &[u8]) {
        let n = acc.len().min(src.len() / 2);
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 <= n: 16 bytes of `src` from byte 2i and 8 values of `acc` from i.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
                let f = _mm256_cvtph_ps(h);
                let p = acc.as_mut_ptr().add(i);
                _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
                _mm256_storeu_pd(p.add(4), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f)));
            }
        }
        for i in full..n {
            acc[i] = half::f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f64();
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn to_f32(acc: &mut [f32], src: &[u8]) {
        let n = acc.len().min(src.len() / 2);
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: as in `to_f64`.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in full..n {
            acc[i] = half::f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32();
        }
    }
}

/// `x` rounded to f32 with round-to-odd: exact values stay, inexact ones become the truncation
/// toward zero with its lowest bit set. Rounding that to a format at least two bits narrower
/// (f16) with round-to-nearest-even gives the correctly rounded result of `x` (no double rounding).
/// Branch-free (selects only), so the caller's loop vectorizes.
#[inline(always)]
fn f32_round_to_odd(x: f64) -> f32 {
    let r = x as f32;
    let back = r as f64;
    // rounded away from zero: step back toward zero (same sign), then set the lowest bit
    let odd = (r.to_bits() - (back.abs() > x.abs()) as u32) | 1;
    let inexact = r.is_finite() & (back != x);
    f32::from_bits(if inexact { odd } else { r.to_bits() })
}

/// `out = f16(acc)` correctly rounded, as [`finish_f64`] writes it, but through F16C where the
/// CPU has it (round-to-odd into f32, then one hardware rounding): the robust merges write every
/// output element from f64. NaN payloads may differ; NaN stays NaN.
pub fn finish_f64_to_f16(acc: &[f64], out: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    assert_eq!(out.len(), acc.len() * 2, "finish_f64_to_f16: output length does not match");
    let mut f = [0f32; 2048];
    let mut h = [half::f16::ZERO; 2048];
    for (a, o) in acc.chunks(2048).zip(out.chunks_mut(4096)) {
        let (f, h) = (&mut f[..a.len()], &mut h[..a.len()]);
        f.iter_mut().zip(a).for_each(|(y, &x)| *y = f32_round_to_odd(x));
        h.convert_from_f32_slice(f);
        o.chunks_exact_mut(2)
            .zip(h.iter())
            .for_each(|(b, v)| b.copy_from_slice(&v.to_bits().to_le_bytes()));
    }
}

/// `out[i] = round(acc[i] / divisor)`, rounded once from f64 straight into `out_dtype`.
pub fn finish_f64(acc: &[f64], divisor: Option<f64>, out: &mut [u8], out_dtype: Dtype) {
    for (i, &a) in acc.iter().enumerate() {
        let x = match divisor {
            Some(n) => a / n,
            None => a,
        };
        store_f64(out, out_dtype, i, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Dtype;

    /// Returns how many leading elements were done (a multiple of 8); the caller does the tail.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn accumulate_avx2(acc: &mut [f32], src: &[u8], dtype: Dtype, weight: Option<f32>) -> usize {
        // SAFETY: the caller guarantees the target features (a detected `Level`) and that
        // `src`/`out` hold `acc.len()` elements; every pointer below stays inside those slices.
        unsafe {
            let n = acc.len() / 8 * 8;
            let a = acc.as_mut_ptr();
            let s = src.as_ptr();
            let w = _mm256_set1_ps(weight.unwrap_or(1.0));
            let weighted = weight.is_some();
            macro_rules! run {
                ($i:ident => $load:expr) => {{
                    let mut $i = 0;
                    while $i < n {
                        // SAFETY: i + 8 <= acc.len(), and src holds acc.len() elements of dtype.
                        let mut x = $load;
                        if weighted {
                            x = _mm256_mul_ps(w, x);
                        }
                        _mm256_storeu_ps(a.add($i), _mm256_add_ps(_mm256_loadu_ps(a.add($i)), x));
                        $i += 8;
                    }
                    n
                }};
            }
            match dtype {
                Dtype::F16 => {
                    run!(i => _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * i) as *const __m128i)))
                }
                Dtype::BF16 => {
                    run!(i => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                        _mm_loadu_si128(s.add(2 * i) as *const __m128i)
                    ))))
                }
                Dtype::F32 => run!(i => _mm256_loadu_ps(s.add(4 * i) as *const f32)),
                _ => 0,
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,f16c")]
    pub unsafe fn accumulate_avx512(acc: &mut [f32], src: &[u8], dtype: Dtype, weight: Option<f32>) -> usize {
        // SAFETY: the caller guarantees the target features (a detected `Level`) and that
        // `src`/`out` hold `acc.len()` elements; every pointer below stays inside those slices.
        unsafe {
            let n = acc.len() / 16 * 16;
            let a = acc.as_mut_ptr();
            let s = src.as_ptr();
            let w = _mm512_set1_ps(weight.unwrap_or(1.0));
            let weighted = weight.is_some();
            macro_rules! run {
                ($i:ident => $load:expr) => {{
                    let mut $i = 0;
                    while $i < n {
                        // SAFETY: i + 16 <= acc.len(), and src holds acc.len() elements of dtype.
                        let mut x = $load;
                        if weighted {
                            x = _mm512_mul_ps(w, x);
                        }
                        _mm512_storeu_ps(a.add($i), _mm512_add_ps(_mm512_loadu_ps(a.add($i)), x));
                        $i += 16;
                    }
                    n
                }};
            }
            let done = match dtype {
                Dtype::F16 => {
                    run!(i => _mm512_cvtph_ps(_mm256_loadu_si256(s.add(2 * i) as *const __m256i)))
                }
                Dtype::BF16 => {
                    run!(i => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256(s.add(2 * i) as *const __m256i)
                    ))))
                }
                Dtype::F32 => run!(i => _mm512_loadu_ps(s.add(4 * i) as *const f32)),
                _ => 0,
            };
            if done == 0 {
                return 0;
            }
            // Let the AVX2 loop take any 8-element block left before the scalar tail.
            let rest = accumulate_avx2(&mut acc[done..], &src[done * dtype.size()..], dtype, weight);
            done + rest
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn finish_avx2(acc: &mut [f32], divisor: Option<f32>, out: &mut [u8], out_dtype: Dtype) -> usize {
        // SAFETY: the caller guarantees the target features (a detected `Level`) and that
        // `src`/`out` hold `acc.len()` elements; every pointer below stays inside those slices.
        unsafe {
            let n = acc.len() / 8 * 8;
            let a = acc.as_ptr();
            let o = out.as_mut_ptr();
            let d = _mm256_set1_ps(divisor.unwrap_or(1.0));
            let divide = divisor.is_some();
            let mut i = 0;
            match out_dtype {
                Dtype::F16 | Dtype::BF16 | Dtype::F32 => {}
                _ => return 0,
            }
            while i < n {
                // SAFETY: i + 8 <= acc.len(); out holds acc.len() elements of out_dtype.
                let mut x = _mm256_loadu_ps(a.add(i));
                if divide {
                    x = _mm256_div_ps(x, d);
                }
                match out_dtype {
                    Dtype::F16 => {
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                        _mm_storeu_si128(o.add(2 * i) as *mut __m128i, h);
                    }
                    Dtype::BF16 => {
                        let b = _mm256_castps_si256(x);
                        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                        let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))));
                        let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
                        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                        let v = _mm256_blendv_epi8(r, nan, is_nan);
                        // packus works per 128-bit lane; put lanes 0 and 2 together.
                        let p = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(v, v));
                        _mm_storeu_si128(o.add(2 * i) as *mut __m128i, _mm256_castsi256_si128(p));
                    }
                    _ => _mm256_storeu_ps(o.add(4 * i) as *mut f32, x),
                }
                i += 8;
            }
            n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn f16_sources_convert_alike_at_any_byte_offset() {
        // every f16 bit pattern (subnormals, infinities, NaNs, -0) and some more, at two offsets
        let vals: Vec<half::f16> = (0..=u16::MAX).chain(0..123).map(half::f16::from_bits).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let want: Vec<f64> = vals.iter().map(|v| v.to_f64()).collect();
        // the same bytes at an even and at an odd address
        let mut buf = vec![0u8; bytes.len() + 2];
        for off in [0usize, 1] {
            let start = (2 - buf.as_ptr() as usize % 2) % 2 + off;
            buf[start..start + bytes.len()].copy_from_slice(&bytes);
            let src = &buf[start..start + bytes.len()];
            let same = |a: f64, w: f64| a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan());
            let mut a64 = vec![0f64; vals.len()];
            load_f64_slice(&mut a64, src, Dtype::F16);
            assert!(a64.iter().zip(&want).all(|(&a, &w)| same(a, w)), "offset {off}");
            let mut a32 = vec![0f32; vals.len()];
            load_f32_slice(&mut a32, src, Dtype::F16);
            assert!(a32.iter().zip(&want).all(|(&a, &w)| same(a as f64, w)), "offset {off}");
        }
    }

    const FLOATS: [Dtype; 6] = [
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
    ];

    fn same_bits(a: &[u8], b: &[u8], dtype: Dtype) -> bool {
        a == b || {
            // NaN payloads may differ in the scalar f64 path; NaN-ness may not.
            let n = a.len() / dtype.size();
            (0..n).all(|i| {
                let (x, y) = (load_f64(a, dtype, i), load_f64(b, dtype, i));
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            })
        }
    }

    #[test]
    fn f64_to_f16_through_round_to_odd_is_correctly_rounded() {
        let mut xs: Vec<f64> = Vec::new();
        // Every f16 value, its neighbours' midpoints and points just beside them, in f64.
        for b in 0u16..=0xFFFF {
            let v = half::f16::from_bits(b);
            if !v.is_finite() {
                continue;
            }
            let x = v.to_f64();
            let next = half::f16::from_bits(b.wrapping_add(1)).to_f64();
            if next.is_finite() && b & 0x7FFF != 0x7BFF {
                let mid = (x + next) / 2.0;
                xs.extend([x, mid, f64::from_bits(mid.to_bits() + 1), f64::from_bits(mid.to_bits() - 1)]);
            }
        }
        let mut seed = 7u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            xs.push(f64::from_bits(seed) % 70000.0);
        }
        xs.extend([
            0.0,
            -0.0,
            1e-300,
            -1e-300,
            65520.0,
            65519.999,
            1e300,
            f64::INFINITY,
            -f64::INFINITY,
        ]);
        let xs: Vec<f64> = xs.into_iter().filter(|x| !x.is_nan()).collect();
        let mut fast = vec![0u8; xs.len() * 2];
        let mut slow = vec![0u8; xs.len() * 2];
        finish_f64_to_f16(&xs, &mut fast);
        finish_f64(&xs, None, &mut slow, Dtype::F16);
        for (i, x) in xs.iter().enumerate() {
            assert_eq!(fast[2 * i..2 * i + 2], slow[2 * i..2 * i + 2], "{x:e}");
        }
    }

    #[test]
    fn f16_encode_matches_half_on_sampled_f32_patterns() {
        for b in (0u32..=u32::MAX)
            .step_by(7919)
            .chain([0x3380_0000, 0x3380_0001, 0x477f_f000, 0x477f_efff, 0x8000_0000])
        {
            let x = f32::from_bits(b);
            let (ours, theirs) = (f32_to_f16(x), half::f16::from_f32(x).to_bits());
            if x.is_nan() {
                assert!(half::f16::from_bits(ours).is_nan(), "{b:#x}");
            } else {
                assert_eq!(ours, theirs, "{b:#x} {x:e}");
            }
        }
    }

    #[test]
    fn f16_decode_is_exact_for_every_pattern() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{h:#x}"
            );
            let exact = F16.decode(h as u32);
            assert!(exact.is_nan() || (ours as f64).to_bits() == exact.to_bits(), "{h:#x}");
        }
    }

    #[test]
    fn minifloat_known_values() {
        assert_eq!(E4M3.decode(0x7E), 448.0);
        assert!(E4M3.decode(0x7F).is_nan());
        assert_eq!(E4M3.encode(464.0), 0x7E); // tie to even stays finite
        assert_eq!(E4M3.encode(470.0), 0x7F); // overflow: NaN, no inf in e4m3fn
        assert_eq!(E5M2.encode(1e9), 0x7C); // overflow: inf
        assert_eq!(E5M2.decode(0x7B), 57344.0);
        assert_eq!(F16.encode(65520.0), 0x7C00);
        assert_eq!(F16.encode(65519.0), 0x7BFF);
        assert_eq!(F16.encode(2f64.powi(-25)), 0); // tie to even subnormal 0
        assert_eq!(F16.encode(2f64.powi(-25) * 1.5), 1);
        assert_eq!(F16.encode(-0.0), 0x8000);
        assert_eq!(BF16.encode(1.0 + 2f64.powi(-8)), 0x3F80); // tie to even
    }

    #[test]
    fn f16_encode_matches_half_on_all_f32_patterns_sampled() {
        for b in (0u32..=u32::MAX).step_by(9973) {
            let x = f32::from_bits(b);
            let ours = F16.encode(x as f64) as u16;
            let theirs = half::f16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(half::f16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
            if !x.is_nan() {
                assert_eq!(BF16.encode(x as f64) as u16, f32_to_bf16(x), "{x:e}");
            }
        }
    }

    #[test]
    fn minifloat_decode_encode_round_trip() {
        for m in [E4M3, E5M2, F16] {
            for b in 0u32..(1 << (1 + m.exp_bits + m.man_bits)) {
                let v = m.decode(b);
                if !v.is_nan() {
                    assert_eq!(m.encode(v), b, "bits {b:#x}");
                }
            }
        }
    }

    fn bytes_strategy(dtype: Dtype, n: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), n * dtype.size())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Every SIMD level gives the scalar kernel's exact bits (odd lengths, unaligned starts).
        #[test]
        fn simd_equals_scalar(
            si in 0usize..6, oi in 0usize..3, n in 0usize..100, off in 0usize..3,
            srcs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 800 + 8), 1..5),
            weighted in any::<bool>(), w in -3.0f32..3.0,
        ) {
            let dtype = FLOATS[si];
            let out_dtype = [Dtype::F16, Dtype::BF16, Dtype::F32][oi];
            let weight = weighted.then_some(w);
            let divisor = (!weighted).then_some(srcs.len() as f32);
            let mut results = vec![];
            for level in Level::available() {
                let mut acc = vec![0f32; n];
                for s in &srcs {
                    let b = &s[off..off + n * dtype.size()];
                    accumulate(level, &mut acc, b, dtype, weight);
                }
                let mut out = vec![0u8; off + n * out_dtype.size()];
                finish(level, &mut acc, divisor, &mut out[off..], out_dtype);
                results.push(out);
            }
            for r in &results[1..] {
                prop_assert!(same_bits(&results[0][off..], &r[off..], out_dtype));
            }
        }

        #[test]
        fn load_is_exact(si in 0usize..6, bytes in bytes_strategy(Dtype::F64, 16)) {
            let dtype = FLOATS[si];
            let n = bytes.len() / dtype.size();
            let mut acc = vec![0f32; n];
            load(&mut acc, &bytes, dtype);
            for (i, a) in acc.iter().enumerate() {
                let r = load_f32(&bytes, dtype, i);
                prop_assert!(a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()));
            }
        }
    }
}
