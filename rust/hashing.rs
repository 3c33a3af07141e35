//! Hashes and statistics over whole files and components, computed from the memory map:
//! file hashes users know (AutoV1/V2/V3), content hashes that ignore prefix, key order and
//! fp16-vs-fp32 storage, the model-toolkit statistic, and L2 distances for `compare`.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels;

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

/// AutoV1/V2/V3 of one open file, reading it once: the data section feeds both digests.
pub fn file_hashes(ck: &Checkpoint) -> Result<FileHashes> {
    let bytes = ck.file.bytes();
    let start = ck.header.data_start;
    let mut whole = Sha256::new();
    whole.update(&bytes[..start]);
    let mut data = Sha256::new();
    for chunk in bytes[start..].chunks(1 << 22) {
        whole.update(chunk);
        data.update(chunk);
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

/// Tensor values widened to f32 (f64 rounded), as little-endian bytes: the canonical form that
/// makes fp16 and fp32 copies of the same values hash alike.
fn canonical(ck: &Checkpoint, key: &str) -> Result<(Vec<u8>, &'static str)> {
    let t = ck.get(key).ok_or_else(|| Error::Mismatch {
        tensor: key.to_string(),
        reason: format!("not found in {}", ck.path().display()),
    })?;
    let raw = ck.data(t);
    if !t.dtype.is_averageable() {
        let v = raw.to_vec();
        ck.file.check_intact()?;
        return Ok((v, t.dtype.name()));
    }
    let mut f = vec![0f32; t.numel()];
    if t.dtype == Dtype::F64 {
        let mut d = vec![0f64; t.numel()];
        kernels::load_f64_slice(&mut d, raw, t.dtype);
        f.iter_mut().zip(&d).for_each(|(a, b)| *a = *b as f32);
    } else {
        kernels::load(&mut f, raw, t.dtype);
    }
    ck.file.check_intact()?;
    Ok((f.iter().flat_map(|x| x.to_le_bytes()).collect(), "float"))
}

/// sha256 over `(name, shape, kind, canonical values)` of each `(name, key)` in name order.
/// `name` is the key without its prefix, so the same weights hash alike in any file layout.
pub fn content_hash(ck: &Checkpoint, entries: &[(String, String)]) -> Result<String> {
    let mut sorted: Vec<&(String, String)> = entries.iter().collect();
    sorted.sort();
    let parts: Vec<Result<Vec<u8>>> = sorted
        .par_iter()
        .map(|(name, key)| {
            let (vals, kind) = canonical(ck, key)?;
            let shape = &ck.get(key).expect("checked").shape;
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            h.update([0]);
            h.update(format!("{shape:?}{kind}").as_bytes());
            h.update([0]);
            h.update(&vals);
            Ok(h.finalize().to_vec())
        })
        .collect();
    let mut all = Sha256::new();
    for p in parts {
        all.update(p?);
    }
    Ok(hex(&all.finalize()))
}

/// The model-toolkit statistic of each tensor: `sum(sigmoid(fp16(x)) - 0.5)`, summed in f64.
pub fn sigmoid_sums(ck: &Checkpoint, keys: &[String]) -> Result<Vec<f64>> {
    keys.par_iter()
        .map(|key| {
            let t = ck.get(key).ok_or_else(|| Error::Mismatch {
                tensor: key.clone(),
                reason: format!("not found in {}", ck.path().display()),
            })?;
            if !t.dtype.is_averageable() {
                return Ok(0.0);
            }
            let mut f = vec![0f32; t.numel()];
            kernels::load(&mut f, ck.data(t), t.dtype);
            ck.file.check_intact()?;
            Ok(f.iter()
                .map(|&x| {
                    let h = half::f16::from_f32(x).to_f32();
                    (1.0 / (1.0 + (-h).exp()) - 0.5) as f64
                })
                .sum())
        })
        .collect()
}

/// For `compare`: per file, `(sum (x - r)^2, sum r^2)` over `keys`, where `r` is the file
/// `reference` or, with `None`, the mean of all files. Streams blocks of elements: memory is a
/// block of every file per thread (about 32 MB), never whole tensors, whatever N is.
pub fn l2_distances(files: &[&Checkpoint], keys: &[String], reference: Option<usize>) -> Result<Vec<(f64, f64)>> {
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
            let mut vals = vec![0f64; n * (e - s)];
            for (ck, v) in files.iter().zip(vals.chunks_mut(e - s)) {
                let t = ck.get(key).expect("checked above");
                let w = t.dtype.size();
                kernels::load_f64_slice(v, &ck.data(t)[s * w..e * w], t.dtype);
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
        assert_eq!(content_hash(&ca, &ea).unwrap(), content_hash(&cb, &eb).unwrap());
        let ec = vec![("x".to_string(), "p.x".to_string())];
        assert_ne!(content_hash(&ca, &ea).unwrap(), content_hash(&ca, &ec).unwrap());
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
        let r = l2_distances(&cks, &["w".to_string()], Some(0)).unwrap();
        assert_eq!(r, vec![(0.0, 5.0), (4.0, 5.0)]);
        let m = l2_distances(&cks, &["w".to_string()], None).unwrap();
        assert_eq!(m[0], (1.0, 1.0 + 9.0));
    }
}
