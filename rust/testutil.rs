//! Builds small safetensors files for the crate's tests.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::Dtype;
use crate::header::{serialize, OutEntry};

/// Writes `tensors` (name, dtype, shape, raw bytes) as a safetensors file.
pub fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let mut pos = 0;
    let mut entries = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        entries.push((name, *dtype, shape, pos, pos + bytes.len()));
        pos += bytes.len();
    }
    let mut out = serialize(
        entries.iter().map(|(n, d, s, b, e)| OutEntry {
            name: n,
            dtype: *d,
            shape: s,
            begin: *b,
            end: *e,
        }),
        &BTreeMap::new(),
    );
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// f32 values as F16 bytes.
pub fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}
