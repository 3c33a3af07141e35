//! Iso-C / Iso-Z (`isotropic_overrided` in the recipes' sd-mecha fork): the singular values of a
//! merged 2-D tensor pulled towards their mean. The only step that holds one whole output tensor
//! (never the N inputs).
//!
//! For a 2-D tensor, or any >2-D one flattened to `[shape[0], rest]` with `high_dim`:
//! `d = U S V^T` (f64), `m = mean(S)` (the geometric mean with `exp`), `S' = m + z (S - m)`,
//! result `U diag(S') V^T`. `z = 0` is Iso-C (a flat spectrum), `z = 1` leaves the tensor as it
//! is. 0-D and 1-D tensors, >2-D ones without `high_dim`, and tensors holding NaN or inf pass
//! through unchanged. The fork divides by var(S) and multiplies it back, which cancels except that
//! var(S) = 0 gives NaN there; here such a spectrum (already flat) stays as it is.

use nalgebra::DMatrix;

/// Parameters of the isotropic step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Iso {
    /// How much of each singular value's distance from the mean is kept (0: Iso-C).
    pub z: f64,
    /// Use the geometric mean of the singular values.
    pub exp: bool,
    /// Flatten >2-D tensors to `[shape[0], rest]` instead of passing them through.
    pub high_dim: bool,
}

impl Iso {
    /// Checks the parameters.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !self.z.is_finite() {
            return Err(format!("z_cof must be finite, not {}", self.z));
        }
        Ok(())
    }

    /// Applies the step to one whole tensor (row-major values of `shape`), in place.
    pub fn apply(&self, vals: &mut [f64], shape: &[usize]) -> std::result::Result<(), String> {
        let two_d = shape.len() == 2 || (shape.len() > 2 && self.high_dim);
        if !two_d || vals.is_empty() || vals.iter().any(|v| !v.is_finite()) {
            return Ok(());
        }
        let rows = shape[0];
        let cols = vals.len() / rows;
        let a = DMatrix::from_row_slice(rows, cols, vals);
        let svd = a
            .try_svd(true, true, f64::EPSILON, 1_000_000)
            .ok_or_else(|| format!("the SVD of a {rows}x{cols} tensor did not converge"))?;
        let s = &svd.singular_values;
        let k = s.len() as f64;
        let mean = if self.exp {
            (s.iter().map(|x| x.ln()).sum::<f64>() / k).exp()
        } else {
            s.sum() / k
        };
        let (Some(mut u), Some(vt)) = (svd.u, svd.v_t) else {
            return Err("the SVD returned no singular vectors".into());
        };
        for (j, mut col) in u.column_iter_mut().enumerate() {
            col *= mean + self.z * (s[j] - mean);
        }
        let r = u * vt;
        for (i, row) in vals.chunks_exact_mut(cols).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = r[(i, j)];
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_one_is_identity_and_z_zero_flattens_the_spectrum() {
        let orig: Vec<f64> = (0..12).map(|i| ((i * 7 % 5) as f64) - 1.5).collect();
        let mut v = orig.clone();
        Iso {
            z: 1.0,
            exp: false,
            high_dim: false,
        }
        .apply(&mut v, &[3, 4])
        .unwrap();
        assert!(v.iter().zip(&orig).all(|(a, b)| (a - b).abs() < 1e-12));
        let mut v = orig.clone();
        Iso {
            z: 0.0,
            exp: false,
            high_dim: false,
        }
        .apply(&mut v, &[3, 4])
        .unwrap();
        let s = DMatrix::from_row_slice(3, 4, &v).singular_values();
        assert!((s[0] - s[2]).abs() < 1e-12, "{s}");
    }

    #[test]
    fn pass_through_cases() {
        let iso = Iso {
            z: 0.0,
            exp: true,
            high_dim: false,
        };
        for (shape, n) in [(vec![5], 5), (vec![2, 2, 2], 8)] {
            let mut v: Vec<f64> = (0..n).map(|i| i as f64).collect();
            let before = v.clone();
            iso.apply(&mut v, &shape).unwrap();
            assert_eq!(v, before);
        }
        let mut v = vec![1.0, f64::NAN, 2.0, 3.0];
        iso.apply(&mut v, &[2, 2]).unwrap();
        assert!(v[1].is_nan() && v[0] == 1.0);
    }

    #[test]
    fn error_bad_z() {
        assert!(Iso {
            z: f64::INFINITY,
            exp: false,
            high_dim: false
        }
        .check()
        .is_err());
    }
}
