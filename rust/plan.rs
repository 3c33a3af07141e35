//! Plans: the one description of work that both executors (this crate's engine, the CUDA path)
//! run. An output tensor is a copy of one input tensor (possibly converted) or a mean of several.
//! `resolve` checks a plan against the opened inputs and lays out the output file.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::header::{self, OutEntry};

/// Precision of the running sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    F32,
    F64,
}

/// One input tensor: which input file, which key.
#[derive(Clone, Debug)]
pub struct Source {
    pub input: usize,
    pub tensor: String,
}

/// How an output tensor is made.
#[derive(Clone, Debug)]
pub enum Op {
    /// A copy (converted if the output dtype differs).
    Copy(Source),
    /// `sum(x_i) / N`, or `sum(w_i * x_i)` with the given (already normalised) weights.
    Mean { sources: Vec<Source>, weights: Option<Vec<f64>> },
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    pub name: String,
    /// `None`: the dtype of the first source.
    pub dtype: Option<Dtype>,
    pub op: Op,
}

/// A whole output file.
#[derive(Clone, Debug)]
pub struct Plan {
    pub inputs: Vec<PathBuf>,
    pub outputs: Vec<OutputTensor>,
    pub accumulate: Accumulate,
    pub metadata: BTreeMap<String, String>,
}

/// A source located in its mapped file.
#[derive(Clone, Copy, Debug)]
pub struct SrcRef {
    pub input: usize,
    pub dtype: Dtype,
    /// Byte offset of the tensor's data in the input file.
    pub offset: usize,
}

/// What to do for one output tensor, checked and located.
#[derive(Clone, Debug)]
pub enum Kind {
    Copy(SrcRef),
    Mean {
        sources: Vec<SrcRef>,
        weights: Option<Vec<f64>>,
    },
}

/// One output tensor, checked and laid out.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub numel: usize,
    /// Offset of this tensor in the output's data section.
    pub out_offset: usize,
    pub out_len: usize,
    pub kind: Kind,
}

/// A checked plan: the output header and every tensor's place.
pub struct Layout {
    pub tensors: Vec<Resolved>,
    pub header: Vec<u8>,
    pub data_len: usize,
    pub bytes_read: u64,
    pub accumulate: Accumulate,
}

/// Normalises weights in f64 to sum 1.
pub fn normalize_weights(w: &[f64]) -> Result<Vec<f64>> {
    if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
        return Err(Error::Plan(format!("weight {bad} is not finite")));
    }
    let s: f64 = w.iter().sum();
    if s == 0.0 || !s.is_finite() {
        return Err(Error::Plan(format!("weights sum to {s}; cannot normalise")));
    }
    Ok(w.iter().map(|x| x / s).collect())
}

/// The provenance every output carries: input file names and sizes, and this tool's version.
fn provenance(inputs: &[Checkpoint]) -> String {
    let items: Vec<String> = inputs
        .iter()
        .map(|c| {
            let name = c.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            format!("{{\"name\":{},\"size\":{}}}", serde_json::to_string(&name).expect("string"), c.file_len)
        })
        .collect();
    format!("[{}]", items.join(","))
}

impl Plan {
    /// Checks the plan against the opened inputs (in `self.inputs` order) and lays out the output.
    pub fn resolve(&self, inputs: &[Checkpoint]) -> Result<Layout> {
        if self.outputs.is_empty() {
            return Err(Error::Plan("the plan has no output tensors".into()));
        }
        let locate = |s: &Source| -> Result<(SrcRef, &[usize])> {
            let ck = inputs
                .get(s.input)
                .ok_or_else(|| Error::Plan(format!("tensor '{}' names input #{} of {}", s.tensor, s.input, inputs.len())))?;
            let t = ck.get(&s.tensor).ok_or_else(|| Error::Mismatch {
                tensor: s.tensor.clone(),
                reason: format!("not found in {}", ck.path.display()),
            })?;
            let r = SrcRef {
                input: s.input,
                dtype: t.dtype,
                offset: ck.header.data_start + t.begin,
            };
            Ok((r, &t.shape))
        };
        let mut seen = HashSet::new();
        let mut tensors = Vec::with_capacity(self.outputs.len());
        let mut pos = 0usize;
        let mut bytes_read = 0u64;
        for o in &self.outputs {
            if !seen.insert(o.name.as_str()) {
                return Err(Error::Plan(format!("output tensor '{}' appears twice", o.name)));
            }
            let mismatch = |reason: String| Error::Mismatch {
                tensor: o.name.clone(),
                reason,
            };
            let (kind, first, shape) = match &o.op {
                Op::Copy(s) => {
                    let (r, shape) = locate(s)?;
                    (Kind::Copy(r), r, shape.to_vec())
                }
                Op::Mean { sources, weights } => {
                    if sources.is_empty() {
                        return Err(Error::Plan(format!("mean for '{}' has no sources", o.name)));
                    }
                    if let Some(w) = weights {
                        if w.len() != sources.len() {
                            return Err(Error::Plan(format!(
                                "'{}' has {} weights for {} sources",
                                o.name,
                                w.len(),
                                sources.len()
                            )));
                        }
                        if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
                            return Err(Error::Plan(format!("'{}': weight {bad} is not finite", o.name)));
                        }
                    }
                    let mut refs = Vec::with_capacity(sources.len());
                    let (r0, shape0) = locate(&sources[0])?;
                    for s in sources {
                        let (r, shape) = locate(s)?;
                        if shape != shape0 {
                            return Err(mismatch(format!(
                                "shape {:?} in {} but {:?} in {}",
                                shape0,
                                inputs[sources[0].input].path.display(),
                                shape,
                                inputs[s.input].path.display()
                            )));
                        }
                        if !r.dtype.is_averageable() {
                            return Err(mismatch(format!(
                                "{} in {} cannot be averaged (only F16, BF16, F32, F64, F8_E4M3, F8_E5M2 can)",
                                r.dtype,
                                inputs[s.input].path.display()
                            )));
                        }
                        refs.push(r);
                    }
                    (
                        Kind::Mean {
                            sources: refs,
                            weights: weights.clone(),
                        },
                        r0,
                        shape0.to_vec(),
                    )
                }
            };
            let dtype = o.dtype.unwrap_or(first.dtype);
            let converting = matches!(kind, Kind::Mean { .. }) || dtype != first.dtype;
            if converting && !dtype.is_averageable() {
                return Err(mismatch(format!("cannot write a mean or conversion as {dtype}")));
            }
            if converting && !first.dtype.is_averageable() {
                return Err(mismatch(format!("cannot convert {} to {dtype}", first.dtype)));
            }
            let numel: usize = shape.iter().product();
            let out_len = dtype
                .byte_len(numel)
                .ok_or_else(|| mismatch(format!("shape {shape:?} overflows")))?;
            bytes_read += match &kind {
                Kind::Copy(r) => r.dtype.byte_len(numel).unwrap_or(0) as u64,
                Kind::Mean { sources, .. } => sources.iter().map(|r| (numel * r.dtype.size()) as u64).sum(),
            };
            tensors.push(Resolved {
                name: o.name.clone(),
                dtype,
                shape,
                numel,
                out_offset: pos,
                out_len,
                kind,
            });
            pos += out_len;
        }
        let mut metadata = self.metadata.clone();
        metadata.insert("astolfomix.inputs".into(), provenance(inputs));
        metadata.insert("astolfomix.version".into(), env!("CARGO_PKG_VERSION").into());
        let header = header::serialize(
            tensors.iter().map(|t| OutEntry {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                begin: t.out_offset,
                end: t.out_offset + t.out_len,
            }),
            &metadata,
        );
        Ok(Layout {
            tensors,
            header,
            data_len: pos,
            bytes_read,
            accumulate: self.accumulate,
        })
    }
}
