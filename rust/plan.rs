//! Plans: the one description of work that both executors (this crate's engine, the CUDA path)
//! run. An output tensor is a copy of one input tensor (possibly converted) or a mean of several.
//! `resolve` checks a plan against the opened inputs and lays out the output file.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Shared: a merge names the same key in every input.
    pub tensor: Arc<str>,
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

/// The provenance every output carries: input file names and sizes.
fn provenance(files: &[(String, u64)]) -> String {
    let items: Vec<String> = files
        .iter()
        .map(|(name, len)| format!("{{\"name\":{},\"size\":{len}}}", serde_json::to_string(name).expect("string")))
        .collect();
    format!("[{}]", items.join(","))
}

fn sources_of(op: &Op) -> &[Source] {
    match op {
        Op::Copy(s) => std::slice::from_ref(s),
        Op::Mean { sources, .. } => sources,
    }
}

/// Resolves a plan one input at a time, so a run never holds more than one parsed header:
/// `add` each opened input (its header may be released right after), then `finish`.
pub struct Resolver<'p> {
    plan: &'p Plan,
    /// For each input, the (output, source) pairs that read from it.
    by_input: Vec<Vec<(u32, u32)>>,
    refs: Vec<Vec<Option<SrcRef>>>,
    /// Per output: the first located source's shape and its input; the others must match.
    shapes: Vec<Option<(Vec<usize>, usize)>>,
    files: Vec<Option<(String, u64)>>,
}

impl<'p> Resolver<'p> {
    /// Checks what can be checked without the files (names, weights, input indices).
    pub fn new(plan: &'p Plan) -> Result<Self> {
        if plan.outputs.is_empty() {
            return Err(Error::Plan("the plan has no output tensors".into()));
        }
        let n = plan.inputs.len();
        let mut by_input = vec![Vec::new(); n];
        let mut seen = HashSet::new();
        for (o, out) in plan.outputs.iter().enumerate() {
            if !seen.insert(out.name.as_str()) {
                return Err(Error::Plan(format!("output tensor '{}' appears twice", out.name)));
            }
            if let Op::Mean { sources, weights } = &out.op {
                if sources.is_empty() {
                    return Err(Error::Plan(format!("mean for '{}' has no sources", out.name)));
                }
                if let Some(w) = weights {
                    if w.len() != sources.len() {
                        return Err(Error::Plan(format!("'{}' has {} weights for {} sources", out.name, w.len(), sources.len())));
                    }
                    if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
                        return Err(Error::Plan(format!("'{}': weight {bad} is not finite", out.name)));
                    }
                }
            }
            for (j, s) in sources_of(&out.op).iter().enumerate() {
                let slot = by_input
                    .get_mut(s.input)
                    .ok_or_else(|| Error::Plan(format!("tensor '{}' names input #{} of {n}", s.tensor, s.input)))?;
                slot.push((o as u32, j as u32));
            }
        }
        Ok(Resolver {
            plan,
            by_input,
            refs: plan.outputs.iter().map(|o| vec![None; sources_of(&o.op).len()]).collect(),
            shapes: vec![None; plan.outputs.len()],
            files: vec![None; n],
        })
    }

    /// Locates every source that reads from input `input` (opened as `ck`).
    pub fn add(&mut self, input: usize, ck: &Checkpoint) -> Result<()> {
        let name = ck.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.files[input] = Some((name, ck.file_len));
        for &(o, j) in &self.by_input[input] {
            let out = &self.plan.outputs[o as usize];
            let src = &sources_of(&out.op)[j as usize];
            let t = ck.get(&src.tensor).ok_or_else(|| Error::Mismatch {
                tensor: src.tensor.to_string(),
                reason: format!("not found in {}", ck.path.display()),
            })?;
            let mismatch = |reason: String| Error::Mismatch {
                tensor: out.name.clone(),
                reason,
            };
            if matches!(out.op, Op::Mean { .. }) && !t.dtype.is_averageable() {
                return Err(mismatch(format!(
                    "{} in {} cannot be averaged (only F16, BF16, F32, F64, F8_E4M3, F8_E5M2 can)",
                    t.dtype,
                    ck.path.display()
                )));
            }
            match &self.shapes[o as usize] {
                None => self.shapes[o as usize] = Some((t.shape.clone(), input)),
                Some((shape, first)) if *shape != t.shape => {
                    return Err(mismatch(format!(
                        "shape {:?} in {} but {:?} in {}",
                        shape,
                        self.plan.inputs[*first].display(),
                        t.shape,
                        ck.path.display()
                    )))
                }
                Some(_) => {}
            }
            self.refs[o as usize][j as usize] = Some(SrcRef {
                input,
                dtype: t.dtype,
                offset: ck.header.data_start + t.begin,
            });
        }
        Ok(())
    }

    /// Lays out the output once every input has been added.
    pub fn finish(self) -> Result<Layout> {
        let mut tensors = Vec::with_capacity(self.plan.outputs.len());
        let mut pos = 0usize;
        let mut bytes_read = 0u64;
        for ((o, refs), shape) in self.plan.outputs.iter().zip(self.refs).zip(self.shapes) {
            let mismatch = |reason: String| Error::Mismatch {
                tensor: o.name.clone(),
                reason,
            };
            let refs: Vec<SrcRef> = refs
                .into_iter()
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Plan(format!("'{}' reads an input that was never opened", o.name)))?;
            let (shape, _) = shape.ok_or_else(|| Error::Plan(format!("'{}' has no source", o.name)))?;
            let first = refs[0];
            let kind = match &o.op {
                Op::Copy(_) => Kind::Copy(first),
                Op::Mean { weights, .. } => Kind::Mean {
                    sources: refs,
                    weights: weights.clone(),
                },
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
        let files: Vec<(String, u64)> = self.files.into_iter().flatten().collect();
        let mut metadata = self.plan.metadata.clone();
        metadata.insert("astolfomix.inputs".into(), provenance(&files));
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
            accumulate: self.plan.accumulate,
        })
    }
}

impl Plan {
    /// Checks the plan against the opened inputs (in `self.inputs` order) and lays out the output.
    pub fn resolve(&self, inputs: &[Checkpoint]) -> Result<Layout> {
        let mut r = Resolver::new(self)?;
        for (i, ck) in inputs.iter().enumerate() {
            r.add(i, ck)?;
        }
        r.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{f16_bytes, write_file};

    fn setup() -> (tempfile::TempDir, Vec<Checkpoint>) {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0])), ("i", Dtype::I64, vec![1], vec![0; 8])]);
        write_file(&b, &[("w", Dtype::F16, vec![1, 2], f16_bytes(&[1.0, 2.0]))]);
        let cks = vec![Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap()];
        (d, cks)
    }

    fn src(input: usize, t: &str) -> Source {
        Source { input, tensor: t.into() }
    }

    fn plan(outputs: Vec<OutputTensor>, cks: &[Checkpoint]) -> Plan {
        Plan {
            inputs: cks.iter().map(|c| c.path.clone()).collect(),
            outputs,
            accumulate: Accumulate::F32,
            metadata: Default::default(),
        }
    }

    fn out(name: &str, dtype: Option<Dtype>, op: Op) -> OutputTensor {
        OutputTensor { name: name.into(), dtype, op }
    }

    fn err(outputs: Vec<OutputTensor>) -> String {
        let (_d, cks) = setup();
        plan(outputs, &cks).resolve(&cks).err().expect("an error").to_string()
    }

    #[test]
    fn error_no_outputs() {
        assert!(err(vec![]).contains("no output tensors"));
    }

    #[test]
    fn error_duplicate_output() {
        let e = err(vec![out("x", None, Op::Copy(src(0, "w"))), out("x", None, Op::Copy(src(0, "w")))]);
        assert!(e.contains("'x' appears twice"), "{e}");
    }

    #[test]
    fn error_mean_without_sources() {
        let e = err(vec![out("x", None, Op::Mean { sources: vec![], weights: None })]);
        assert!(e.contains("no sources"), "{e}");
    }

    #[test]
    fn error_weights() {
        let e = err(vec![out("x", None, Op::Mean { sources: vec![src(0, "w")], weights: Some(vec![0.5, 0.5]) })]);
        assert!(e.contains("2 weights for 1 sources"), "{e}");
        let e = err(vec![out("x", None, Op::Mean { sources: vec![src(0, "w")], weights: Some(vec![f64::NAN]) })]);
        assert!(e.contains("not finite"), "{e}");
    }

    #[test]
    fn error_input_out_of_range() {
        let e = err(vec![out("x", None, Op::Copy(src(5, "w")))]);
        assert!(e.contains("input #5 of 2"), "{e}");
    }

    #[test]
    fn error_missing_tensor_names_file() {
        let e = err(vec![out("x", None, Op::Copy(src(1, "i")))]);
        assert!(e.contains("'i'") && e.contains("b.safetensors"), "{e}");
    }

    #[test]
    fn error_shape_mismatch_names_both_files() {
        let e = err(vec![out("w", None, Op::Mean { sources: vec![src(0, "w"), src(1, "w")], weights: None })]);
        assert!(e.contains("[2]") && e.contains("[1, 2]") && e.contains("a.safetensors") && e.contains("b.safetensors"), "{e}");
    }

    #[test]
    fn error_int_mean_and_conversion() {
        let e = err(vec![out("i", None, Op::Mean { sources: vec![src(0, "i")], weights: None })]);
        assert!(e.contains("I64") && e.contains("cannot be averaged"), "{e}");
        let e = err(vec![out("i", Some(Dtype::F16), Op::Copy(src(0, "i")))]);
        assert!(e.contains("cannot convert I64"), "{e}");
        let e = err(vec![out("w", Some(Dtype::I32), Op::Copy(src(0, "w")))]);
        assert!(e.contains("as I32"), "{e}");
    }

    #[test]
    fn layout_and_provenance() {
        let (_d, cks) = setup();
        let p = plan(
            vec![out("w", Some(Dtype::F32), Op::Copy(src(0, "w"))), out("i", None, Op::Copy(src(0, "i")))],
            &cks,
        );
        let l = p.resolve(&cks).unwrap();
        assert_eq!((l.tensors[0].out_offset, l.tensors[0].out_len, l.tensors[1].out_offset), (0, 8, 8));
        assert_eq!(l.data_len, 16);
        assert_eq!(l.bytes_read, 4 + 8);
        let text = String::from_utf8_lossy(&l.header);
        assert!(text.contains("astolfomix.inputs") && text.contains("a.safetensors"), "{text}");
    }
}
