//! Hashes and statistics over whole files and components, computed from the memory map:
//! file hashes users know (AutoV1/V2/V3), content hashes that ignore prefix, key order and
//! fp16-vs-fp32 storage, the model-toolkit statistic, and L2 distances for `compare`.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::kernels;
use std::sync::atomic::Ordering;

/// Hashes of one file.
#[derive(Clone, Debug)]
pub struct FileHashes {
    /// sha256 of the whole file (AutoV2 is its first 10 hex digits).
    pub sha256: String,
    /// The webui legacy hash: sha256 of 0x10000 bytes at 0x100000, first 8 hex digits.
    pub autov1: String,
    /// sha256 of the tensor data (after the header).
    pub autov3: String,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes per read while hashing a file.
const BLOCK: usize = 1 << 22;

/// Stops a hashing pass when Ctrl-C asked for it.
fn check_cancel(progress: &Progress) -> Result<()> {
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    Ok(())
}

/// AutoV1/V2/V3 of one open file, reading it once: the two digests (whole file, data section)
/// run side by side on each block, so the pass costs one digest's time on two cores. `progress`
/// counts the bytes read.
pub fn file_hashes(ck: &Checkpoint, progress: &Progress) -> Result<FileHashes> {
    let bytes = ck.file.bytes();
    let start = ck.header.data_start;
    let mut whole = Sha256::new();
    whole.update(&bytes[..start]);
    let mut data = Sha256::new();
    for chunk in bytes[start..].chunks(BLOCK) {
        check_cancel(progress)?;
        rayon::join(|| whole.update(chunk), || data.update(chunk));
        progress.done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    let lo = 0x100000.min(bytes.len());
    let hi = 0x110000.min(bytes.len());
    let h = FileHashes {
        sha256: hex(&whole.finalize()),
        autov1: hex(&Sha256::digest(&bytes[lo..hi]))[..8].to_string(),
        autov3: hex(&data.finalize()),
    };
    ck.file.check_intact()?;
    Ok(h)
}

/// Views f32 values as their little-endian bytes (the canonical form hashed below).
fn f32_le_bytes(v: &[f32]) -> &[u8] {
    #[cfg(not(target_endian = "little"))]
    compile_error!("content hashes assume a little-endian target");
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; the length is the exact
    // byte size of the slice, and the borrow keeps `v` alive.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Elements converted per step: bounded memory, whatever the tensor's size.
const STEP: usize = 1 << 16;

/// Feeds `h` the canonical form of one tensor: its values widened to f32 (f64 rounded) as
/// little-endian bytes, so fp16 and fp32 copies of the same values hash alike; other dtypes
/// their stored bytes. Returns the kind hashed ("float" or the dtype).
fn hash_canonical(h: &mut Sha256, raw: &[u8], dtype: Dtype) -> &'static str {
    if !dtype.is_averageable() {
        h.update(raw);
        return dtype.name();
    }
    let size = dtype.size();
    let mut f = vec![0f32; STEP.min(raw.len() / size.max(1))];
    match dtype {
        Dtype::F32 => h.update(raw), // already the canonical bytes
        Dtype::F16 => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            let mut bits = vec![0u16; f.len()];
            for c in raw.chunks(2 * STEP) {
                let n = c.len() / 2;
                bits[..n]
                    .iter_mut()
                    .zip(c.chunks_exact(2))
                    .for_each(|(x, y)| *x = u16::from_le_bytes([y[0], y[1]]));
                bits[..n].reinterpret_cast::<half::f16>().convert_to_f32_slice(&mut f[..n]);
                h.update(f32_le_bytes(&f[..n]));
            }
        }
        Dtype::F64 => {
            for c in raw.chunks(8 * STEP) {
                let n = c.len() / 8;
                f[..n]
                    .iter_mut()
                    .zip(c.chunks_exact(8))
                    .for_each(|(a, b)| *a = f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32);
                h.update(f32_le_bytes(&f[..n]));
            }
        }
        _ => {
            for c in raw.chunks(size * STEP) {
                let n = c.len() / size;
                kernels::load(&mut f[..n], c, dtype);
                h.update(f32_le_bytes(&f[..n]));
            }
        }
    }
    "float"
}

/// sha256 over `(name, shape, kind, canonical values)` of each `(name, key)` in name order.
/// `name` is the key without its prefix, so the same weights hash alike in any file layout.
/// Tensors are hashed in parallel, each streamed in steps; `progress` counts stored bytes.
pub fn content_hash(ck: &Checkpoint, entries: &[(String, String)], progress: &Progress) -> Result<String> {
    let mut sorted: Vec<&(String, String)> = entries.iter().collect();
    sorted.sort();
    let parts: Vec<Result<Vec<u8>>> = sorted
        .par_iter()
        .map(|(name, key)| {
            check_cancel(progress)?;
            let t = ck.get(key).ok_or_else(|| Error::Mismatch {
                tensor: key.to_string(),
                reason: format!("not found in {}", ck.path().display()),
            })?;
            // The values follow the kind in the stream, so the kind is decided first.
            let kind = if t.dtype.is_averageable() { "float" } else { t.dtype.name() };
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            h.update([0]);
            h.update(format!("{:?}{kind}", t.shape).as_bytes());
            h.update([0]);
            hash_canonical(&mut h, ck.data(t), t.dtype);
            progress.done.fetch_add((t.end - t.begin) as u64, Ordering::Relaxed);
            Ok(h.finalize().to_vec())
        })
        .collect();
    let mut all = Sha256::new();
    for p in parts {
        all.update(p?);
    }
    ck.file.check_intact()?;
    Ok(hex(&all.finalize()))
}

/// `sigmoid(h) - 0.5` for every f16 value `h`, as the toolkit computes it (in f32), indexed by
/// the f16 bits: the statistic reads each element once and looks its term up.
fn sigmoid_table() -> &'static [f64] {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| {
                let h = half::f16::from_bits(b).to_f32();
                (1.0 / (1.0 + (-h).exp()) - 0.5) as f64
            })
            .collect()
    })
}

/// The model-toolkit statistic of each tensor: `sum(sigmoid(fp16(x)) - 0.5)`, summed in f64 in
/// element order.
pub fn sigmoid_sums(ck: &Checkpoint, keys: &[String], progress: &Progress) -> Result<Vec<f64>> {
    let table = sigmoid_table();
    let sums = keys
        .par_iter()
        .map(|key| {
            check_cancel(progress)?;
            let t = ck.get(key).ok_or_else(|| Error::Mismatch {
                tensor: key.clone(),
                reason: format!("not found in {}", ck.path().display()),
            })?;
            if !t.dtype.is_averageable() {
                return Ok(0.0);
            }
            let raw = ck.data(t);
            let mut sum = 0f64;
            if t.dtype == Dtype::F16 {
                for c in raw.chunks_exact(2) {
                    sum += table[u16::from_le_bytes([c[0], c[1]]) as usize];
                }
            } else {
                let size = t.dtype.size();
                let mut f = vec![0f32; STEP.min(t.numel())];
                for c in raw.chunks(size * STEP) {
                    let n = c.len() / size;
                    kernels::load(&mut f[..n], c, t.dtype);
                    for &x in &f[..n] {
                        sum += table[half::f16::from_f32(x).to_bits() as usize];
                    }
                }
            }
            progress.done.fetch_add((t.end - t.begin) as u64, Ordering::Relaxed);
            Ok(sum)
        })
        .collect::<Result<Vec<f64>>>()?;
    ck.file.check_intact()?;
    Ok(sums)
}

/// For `compare`: per file, `(sum (x - r)^2, sum r^2)` over `keys`, where `r` is the file
/// `reference` or, with `None`, the mean of all files. Streams blocks of elements: memory is a
/// block of every file per thread (about 32 MB), never whole tensors, whatever N is.
pub fn l2_distances(
    files: &[&Checkpoint],
    keys: &[String],
    reference: Option<usize>,
    progress: &Progress,
) -> Result<Vec<(f64, f64)>> {
    let n = files.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let block = ((1usize << 22) / n).max(1024);
    // (key, start, end) work items; keys whose tensors are not floats count as zero.
    let mut items = Vec::new();
    for key in keys {
        let mut numel = None;
        let mut skip = false;
        for ck in files {
            let t = ck.get(key).ok_or_else(|| Error::Mismatch {
                tensor: key.clone(),
                reason: format!("not found in {}", ck.path().display()),
            })?;
            skip |= !t.dtype.is_averageable();
            match numel {
                None => numel = Some(t.numel()),
                Some(m) if m != t.numel() => {
                    return Err(Error::Mismatch {
                        tensor: key.clone(),
                        reason: format!(
                            "{m} elements in {} but {} in {}",
                            files[0].path().display(),
                            t.numel(),
                            ck.path().display()
                        ),
                    })
                }
                _ => {}
            }
        }
        let numel = numel.unwrap_or(0);
        if !skip {
            items.extend((0..numel).step_by(block).map(|s| (key, s, (s + block).min(numel))));
        }
    }
    // Each item's partial sums, added afterwards in item order: the same bits for any thread count.
    let partials: Vec<Vec<(f64, f64)>> = items
        .par_iter()
        .map(|&(key, s, e)| {
            check_cancel(progress)?;
            let mut vals = vec![0f64; n * (e - s)];
            for (ck, v) in files.iter().zip(vals.chunks_mut(e - s)) {
                let t = ck.get(key).expect("checked above");
                let w = t.dtype.size();
                kernels::load_f64_slice(v, &ck.data(t)[s * w..e * w], t.dtype);
                progress.done.fetch_add(((e - s) * w) as u64, Ordering::Relaxed);
            }
            let len = e - s;
            let r: Vec<f64> = match reference {
                Some(i) => vals[i * len..(i + 1) * len].to_vec(),
                None => (0..len)
                    .map(|j| (0..n).map(|f| vals[f * len + j]).sum::<f64>() / n as f64)
                    .collect(),
            };
            let den: f64 = r.iter().map(|x| x * x).sum();
            Ok(vals
                .chunks(len)
                .map(|v| (v.iter().zip(&r).map(|(a, b)| (a - b) * (a - b)).sum::<f64>(), den))
                .collect())
        })
        .collect::<Result<_>>()?;
    for ck in files {
        ck.file.check_intact()?;
    }
    let mut out = vec![(0.0, 0.0); n];
    for k in partials {
        for (o, (a, b)) in out.iter_mut().zip(k) {
            o.0 += a;
            o.1 += b;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{f16_bytes, write_file};

    #[test]
    fn content_hash_ignores_prefix_order_and_storage() {
        let d = tempfile::tempdir().unwrap();
        let v = [0.5f32, -1.25, 3.0];
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        write_file(
            &a,
            &[
                ("p.x", Dtype::F16, vec![3], f16_bytes(&v)),
                ("p.y", Dtype::F16, vec![1], f16_bytes(&[2.0])),
            ],
        );
        let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_file(
            &b,
            &[
                ("q.y", Dtype::F32, vec![1], 2f32.to_le_bytes().to_vec()),
                ("q.x", Dtype::F32, vec![3], f32b),
            ],
        );
        let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
        let ea = vec![("x".to_string(), "p.x".to_string()), ("y".to_string(), "p.y".to_string())];
        let eb = vec![("y".to_string(), "q.y".to_string()), ("x".to_string(), "q.x".to_string())];
        let p = Progress::default();
        assert_eq!(content_hash(&ca, &ea, &p).unwrap(), content_hash(&cb, &eb, &p).unwrap());
        let ec = vec![("x".to_string(), "p.x".to_string())];
        assert_ne!(content_hash(&ca, &ea, &p).unwrap(), content_hash(&ca, &ec, &p).unwrap());
    }

    #[test]
    fn l2_to_reference() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0]))]);
        write_file(&b, &[("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 4.0]))]);
        let cks = [Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap()];
        let cks: Vec<&Checkpoint> = cks.iter().collect();
        let p = Progress::default();
        let r = l2_distances(&cks, &["w".to_string()], Some(0), &p).unwrap();
        assert_eq!(r, vec![(0.0, 5.0), (4.0, 5.0)]);
        let m = l2_distances(&cks, &["w".to_string()], None, &p).unwrap();
        assert_eq!(m[0], (1.0, 1.0 + 9.0));
    }
}
