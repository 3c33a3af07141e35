//! Plans: the one description of work that both executors (this crate's engine, the torch
//! path) run. An output tensor is a copy of one input tensor, a cast, a mean of several, or a
//! constant carried by the plan. A [`Resolver`] checks a plan against the opened inputs and
//! produces a [`Layout`]: every decision an executor needs (raw copy or conversion, working
//! precision, offsets, the output header), so executors only execute.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::checkpoint::{Checkpoint, InputFile};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::header::{self, OutEntry};
use crate::robust::Expr;

/// Precision of the running sum (and of conversions that need more than f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// fp32: the default, and what the SIMD kernels run.
    F32,
    /// fp64, rounded once into the output dtype.
    F64,
}

impl Accumulate {
    /// `"f32"` or `"f64"`.
    pub fn name(self) -> &'static str {
        match self {
            Accumulate::F32 => "f32",
            Accumulate::F64 => "f64",
        }
    }
}

/// One input tensor: which input file, which key.
#[derive(Clone, Debug)]
pub struct Source {
    /// Index into the plan's inputs.
    pub input: usize,
    /// Shared: a merge names the same key in every input.
    pub tensor: Arc<str>,
}

/// Bytes a plan carries itself (a constant tensor). Any owner of bytes will do, so the Python
/// side can lend a numpy buffer without a copy.
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// How an output tensor is made.
#[derive(Clone)]
pub enum Op {
    /// A copy; converted if the output dtype differs (then the same as `Cast`).
    Copy(Source),
    /// A conversion into the output dtype.
    Cast(Source),
    /// `sum(x_i) / N`, or `sum(w_i * x_i)` with the given (already normalised) weights.
    Mean {
        /// The inputs, added in this order.
        sources: Vec<Source>,
        /// `None`: uniform.
        weights: Option<Vec<f64>>,
    },
    /// A robust merge expression over `sources` (see [`crate::robust`]), computed in the plan's
    /// `precision`.
    Expr {
        /// The inputs the expression reads.
        sources: Vec<Source>,
        /// Linear terms and robust nodes over them.
        expr: Arc<Expr>,
    },
    /// Bytes given by the plan, stored as `dtype` with `shape`.
    Constant {
        /// Stored dtype.
        dtype: Dtype,
        /// Shape.
        shape: Vec<usize>,
        /// Exactly `dtype.byte_len(numel)` bytes.
        data: Bytes,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Copy(s) => write!(f, "Copy({s:?})"),
            Op::Cast(s) => write!(f, "Cast({s:?})"),
            Op::Mean { sources, weights } => write!(f, "Mean({sources:?}, {weights:?})"),
            Op::Constant { dtype, shape, .. } => write!(f, "Constant({dtype}, {shape:?})"),
            Op::Expr { sources, expr } => write!(f, "Expr({sources:?}, {expr:?})"),
        }
    }
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    /// Its name in the output.
    pub name: String,
    /// `None`: the dtype of the first source (or of the constant).
    pub dtype: Option<Dtype>,
    /// How it is made.
    pub op: Op,
}

/// A whole output file.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Output tensors, in file order.
    pub outputs: Vec<OutputTensor>,
    /// Working precision of means.
    pub accumulate: Accumulate,
    /// Working precision of robust merge expressions (f64 unless asked).
    pub precision: Accumulate,
    /// The output's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// A source located in its mapped file.
#[derive(Clone, Copy, Debug)]
pub struct SrcRef {
    /// Index into the layout's inputs.
    pub input: usize,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Byte offset of the tensor's data in the input file.
    pub offset: usize,
}

/// What to do for one output tensor, checked and located: the executor's whole instruction.
#[derive(Clone)]
pub enum Kind {
    /// The stored bytes, unchanged.
    Copy(SrcRef),
    /// Convert each element through `via` into the output dtype (exact widening, one rounding).
    Cast {
        /// The source.
        src: SrcRef,
        /// Precision of the intermediate value.
        via: Accumulate,
    },
    /// The mean (see the crate docs for the exact recipe).
    Mean {
        /// The sources, added in this order.
        sources: Vec<SrcRef>,
        /// `None`: uniform, divide by N.
        weights: Option<Vec<f64>>,
        /// Accumulator precision.
        via: Accumulate,
    },
    /// Bytes carried by the plan.
    Constant(Bytes),
    /// A robust merge expression, computed in `via` and rounded once.
    Expr {
        /// The sources, as the expression numbers them.
        sources: Vec<SrcRef>,
        /// The expression.
        expr: Arc<Expr>,
        /// Working precision.
        via: Accumulate,
    },
}

impl Kind {
    /// The op's name as the Python side spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Copy(_) => "copy",
            Kind::Cast { .. } => "cast",
            Kind::Mean { .. } => "mean",
            Kind::Constant(_) => "constant",
            Kind::Expr { .. } => "expr",
        }
    }

    /// The located sources (none for a constant).
    pub fn sources(&self) -> &[SrcRef] {
        match self {
            Kind::Copy(r) | Kind::Cast { src: r, .. } => std::slice::from_ref(r),
            Kind::Mean { sources, .. } | Kind::Expr { sources, .. } => sources,
            Kind::Constant(_) => &[],
        }
    }
}

/// One output tensor, checked and laid out.
#[derive(Clone)]
pub struct Resolved {
    /// Its name in the output.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element count.
    pub numel: usize,
    /// Offset of this tensor in the output's data section.
    pub out_offset: usize,
    /// Its byte length in the output.
    pub out_len: usize,
    /// How to make it.
    pub kind: Kind,
}

/// A resolved plan: the opened inputs it reads, the output header and every tensor's place.
pub struct Layout {
    /// The inputs (the files only: their parsed headers are not kept).
    pub inputs: Vec<Arc<InputFile>>,
    /// Output tensors in file order.
    pub tensors: Vec<Resolved>,
    /// The serialized output header (length prefix included).
    pub header: Vec<u8>,
    /// Length of the output's data section.
    pub data_len: usize,
    /// Input bytes the plan reads.
    pub bytes_read: u64,
}

impl Layout {
    /// (device, inode) of every input, for the writer's checks.
    pub fn identities(&self) -> Vec<(u64, u64)> {
        self.inputs.iter().map(|f| f.identity).collect()
    }
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
        Op::Copy(s) | Op::Cast(s) => std::slice::from_ref(s),
        Op::Mean { sources, .. } | Op::Expr { sources, .. } => sources,
        Op::Constant { .. } => &[],
    }
}

/// The executor's instruction for one output: raw copy, cast (and through which precision), mean
/// or constant, with the shape and the output dtype.
fn decide(
    o: &OutputTensor,
    refs: Vec<SrcRef>,
    shape: Option<(Vec<usize>, usize)>,
    accumulate: Accumulate,
    precision: Accumulate,
) -> Result<(Kind, Vec<usize>, Dtype)> {
    let mismatch = |reason: String| Error::Mismatch {
        tensor: o.name.clone(),
        reason,
    };
    let decided = match &o.op {
        Op::Constant { dtype, shape, data } => (Kind::Constant(data.clone()), shape.clone(), *dtype),
        op => {
            let (shape, _) = shape.ok_or_else(|| Error::Plan(format!("'{}' has no source", o.name)))?;
            let first = refs[0];
            let dtype = o.dtype.unwrap_or(first.dtype);
            let converting = matches!(op, Op::Mean { .. } | Op::Expr { .. }) || dtype != first.dtype;
            if converting && !dtype.is_averageable() {
                return Err(mismatch(format!("cannot write a mean or conversion as {dtype}")));
            }
            if converting && !first.dtype.is_averageable() {
                return Err(mismatch(format!("cannot convert {} to {dtype}", first.dtype)));
            }
            let kind = match op {
                Op::Mean { weights, .. } => Kind::Mean {
                    sources: refs,
                    weights: weights.clone(),
                    via: accumulate,
                },
                Op::Expr { expr, .. } => Kind::Expr {
                    sources: refs,
                    expr: expr.clone(),
                    via: precision,
                },
                _ if !converting => Kind::Copy(first),
                // f32 holds every value of the other float types exactly, so only f64 on
                // either side needs the f64 path; the result is one rounding either way.
                _ => Kind::Cast {
                    src: first,
                    via: if first.dtype == Dtype::F64 || dtype == Dtype::F64 {
                        Accumulate::F64
                    } else {
                        Accumulate::F32
                    },
                },
            };
            (kind, shape, dtype)
        }
    };
    Ok(decided)
}

/// Checks one output on its own (before any file is opened): sources, weights, constants.
fn check_output(out: &OutputTensor) -> Result<()> {
    match &out.op {
        Op::Mean { sources, weights } => {
            if sources.is_empty() {
                return Err(Error::Plan(format!("mean for '{}' has no sources", out.name)));
            }
            if let Some(w) = weights {
                if w.len() != sources.len() {
                    return Err(Error::Plan(format!(
                        "'{}' has {} weights for {} sources",
                        out.name,
                        w.len(),
                        sources.len()
                    )));
                }
                if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
                    return Err(Error::Plan(format!("'{}': weight {bad} is not finite", out.name)));
                }
            }
        }
        Op::Constant { dtype, shape, data } => {
            let want = shape
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .and_then(|n| dtype.byte_len(n));
            if want != Some((**data).as_ref().len()) {
                return Err(Error::Plan(format!(
                    "constant '{}': {} bytes given for {dtype}{shape:?}",
                    out.name,
                    (**data).as_ref().len()
                )));
            }
            if out.dtype.is_some_and(|d| d != *dtype) {
                return Err(Error::Plan(format!(
                    "constant '{}' is {dtype}; it cannot be written as another dtype",
                    out.name
                )));
            }
        }
        Op::Expr { sources, expr } => {
            if sources.is_empty() {
                return Err(Error::Plan(format!("expression for '{}' has no sources", out.name)));
            }
            expr.check(sources.len())
                .map_err(|e| Error::Plan(format!("'{}': {e}", out.name)))?;
        }
        Op::Copy(_) | Op::Cast(_) => {}
    }
    if matches!(out.op, Op::Cast(_)) && out.dtype.is_none() {
        return Err(Error::Plan(format!("cast '{}' needs an output dtype", out.name)));
    }
    Ok(())
}

/// Resolves a plan one input at a time, so a run never needs more than one parsed header at
/// once: `add` each opened input (its header may be dropped right after), then `finish`.
pub struct Resolver {
    plan: Plan,
    /// For each input, the (output, source) pairs that read from it.
    by_input: Vec<Vec<(u32, u32)>>,
    refs: Vec<Vec<Option<SrcRef>>>,
    /// Per output: the first located source's shape and its input; the others must match.
    shapes: Vec<Option<(Vec<usize>, usize)>>,
    files: Vec<Option<Arc<InputFile>>>,
    /// Problems found while adding inputs, reported together by `finish`.
    problems: Vec<Error>,
    /// Inputs with more problems than were kept: (file, how many more).
    more: Vec<(std::path::PathBuf, usize)>,
}

/// Problems listed per input before the rest are only counted.
const PROBLEMS_PER_INPUT: usize = 5;

impl Resolver {
    /// Checks what can be checked without the files (names, weights, input indices, constants).
    pub fn new(plan: Plan, n_inputs: usize) -> Result<Self> {
        if plan.outputs.is_empty() {
            return Err(Error::Plan("the plan has no output tensors".into()));
        }
        let mut by_input = vec![Vec::new(); n_inputs];
        let mut seen = HashSet::new();
        for (o, out) in plan.outputs.iter().enumerate() {
            if !seen.insert(out.name.as_str()) {
                return Err(Error::Plan(format!("output tensor '{}' appears twice", out.name)));
            }
            check_output(out)?;
            for (j, s) in sources_of(&out.op).iter().enumerate() {
                let slot = by_input
                    .get_mut(s.input)
                    .ok_or_else(|| Error::Plan(format!("tensor '{}' names input #{} of {n_inputs}", s.tensor, s.input)))?;
                slot.push((o as u32, j as u32));
            }
        }
        let refs = plan.outputs.iter().map(|o| vec![None; sources_of(&o.op).len()]).collect();
        let shapes = vec![None; plan.outputs.len()];
        Ok(Resolver {
            plan,
            by_input,
            refs,
            shapes,
            files: vec![None; n_inputs],
            problems: Vec::new(),
            more: Vec::new(),
        })
    }

    /// Replaces the metadata the output header will carry (callers that learn it while adding).
    pub fn set_metadata(&mut self, metadata: BTreeMap<String, String>) {
        self.plan.metadata = metadata;
    }

    /// Locates every source that reads from input `input` (opened as `ck`) and keeps the file.
    /// Problems (a missing tensor, a shape that differs, a dtype that cannot be averaged) are
    /// collected, not returned: [`Resolver::finish`] reports every one of them at once.
    pub fn add(&mut self, input: usize, ck: &Checkpoint) -> Result<()> {
        let n = self.files.len();
        let slot = self
            .files
            .get_mut(input)
            .ok_or_else(|| Error::Plan(format!("input #{input} of {n}")))?;
        *slot = Some(ck.file.clone());
        let mut found = 0usize;
        for k in 0..self.by_input[input].len() {
            let (o, j) = self.by_input[input][k];
            match self.locate(o as usize, j as usize, input, ck) {
                Ok(r) => self.refs[o as usize][j as usize] = Some(r),
                Err(e) => {
                    found += 1;
                    // A file of the wrong kind differs in thousands of tensors: list a few.
                    if found <= PROBLEMS_PER_INPUT {
                        self.problems.push(e);
                    }
                }
            }
        }
        if found > PROBLEMS_PER_INPUT {
            self.more.push((ck.path().to_path_buf(), found - PROBLEMS_PER_INPUT));
        }
        Ok(())
    }

    fn locate(&mut self, o: usize, j: usize, input: usize, ck: &Checkpoint) -> Result<SrcRef> {
        let out = &self.plan.outputs[o];
        let src = &sources_of(&out.op)[j];
        let t = ck.get(&src.tensor).ok_or_else(|| Error::Mismatch {
            tensor: src.tensor.to_string(),
            reason: format!("not found in {}", ck.path().display()),
        })?;
        let mismatch = |reason: String| Error::Mismatch {
            tensor: out.name.clone(),
            reason,
        };
        if matches!(out.op, Op::Mean { .. } | Op::Expr { .. }) && !t.dtype.is_averageable() {
            return Err(mismatch(format!(
                "{} in {} cannot be averaged (only F16, BF16, F32, F64, F8_E4M3, F8_E5M2 can)",
                t.dtype,
                ck.path().display()
            )));
        }
        match &self.shapes[o] {
            None => self.shapes[o] = Some((t.shape.clone(), input)),
            Some((shape, first)) if *shape != t.shape => {
                let first = self.files[*first]
                    .as_ref()
                    .map(|f| f.path.display().to_string())
                    .unwrap_or_default();
                return Err(mismatch(format!(
                    "shape {:?} in {first} but {:?} in {}",
                    shape,
                    t.shape,
                    ck.path().display()
                )));
            }
            Some(_) => {}
        }
        Ok(SrcRef {
            input,
            dtype: t.dtype,
            offset: ck.header.data_start + t.begin,
        })
    }

    /// Decides how each tensor is made and lays out the output once every input has been added.
    pub fn finish(mut self) -> Result<Layout> {
        if self.problems.len() == 1 && self.more.is_empty() {
            return Err(self.problems.remove(0));
        }
        if !self.problems.is_empty() {
            return Err(Error::Problems {
                problems: self.problems,
                more: self.more,
            });
        }
        let mut tensors = Vec::with_capacity(self.plan.outputs.len());
        let mut pos = 0usize;
        let mut bytes_read = 0u64;
        let accumulate = self.plan.accumulate;
        for ((o, refs), shape) in self.plan.outputs.iter().zip(self.refs).zip(self.shapes) {
            let mismatch = |reason: String| Error::Mismatch {
                tensor: o.name.clone(),
                reason,
            };
            let refs: Vec<SrcRef> = refs
                .into_iter()
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Plan(format!("'{}' reads an input that was never opened", o.name)))?;
            let (kind, shape, dtype) = decide(o, refs, shape, accumulate, self.plan.precision)?;
            let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
            let out_len = numel
                .and_then(|n| dtype.byte_len(n))
                .ok_or_else(|| mismatch(format!("shape {shape:?} overflows")))?;
            let numel = numel.unwrap_or(0);
            let per_source: Vec<u64> = kind
                .sources()
                .iter()
                .map(|r| r.dtype.byte_len(numel).unwrap_or(0) as u64)
                .collect();
            bytes_read += match &kind {
                Kind::Expr { expr, .. } => expr.bytes_read(&per_source),
                _ => per_source.iter().sum(),
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
        let inputs: Vec<Arc<InputFile>> = self
            .files
            .into_iter()
            .enumerate()
            .map(|(i, f)| f.ok_or_else(|| Error::Plan(format!("input #{i} was never opened"))))
            .collect::<Result<_>>()?;
        let files: Vec<(String, u64)> = inputs
            .iter()
            .map(|f| {
                (
                    f.path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    f.file_len,
                )
            })
            .collect();
        let mut metadata = self.plan.metadata;
        // A plan of constants only (a file saved from memory) carries just the caller's metadata.
        if !files.is_empty() {
            metadata.insert("astolfomix.inputs".into(), provenance(&files));
            metadata.insert("astolfomix.version".into(), env!("CARGO_PKG_VERSION").into());
        }
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
        if header.len() as u64 - 8 > header::MAX_HEADER {
            let meta: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
            return Err(Error::Plan(format!(
                "the output header would be {} bytes ({meta} of them metadata), over the {}-byte limit readers accept; \
                 nothing written",
                header.len() - 8,
                header::MAX_HEADER
            )));
        }
        Ok(Layout {
            inputs,
            tensors,
            header,
            data_len: pos,
            bytes_read,
        })
    }
}

impl Plan {
    /// Checks the plan against the opened inputs (in input order) and lays out the output.
    pub fn resolve(self, inputs: &[Checkpoint]) -> Result<Layout> {
        let mut r = Resolver::new(self, inputs.len())?;
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
        write_file(
            &a,
            &[
                ("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0])),
                ("i", Dtype::I64, vec![1], vec![0; 8]),
            ],
        );
        write_file(&b, &[("w", Dtype::F16, vec![1, 2], f16_bytes(&[1.0, 2.0]))]);
        let cks = vec![Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap()];
        (d, cks)
    }

    fn src(input: usize, t: &str) -> Source {
        Source { input, tensor: t.into() }
    }

    fn plan(outputs: Vec<OutputTensor>, _cks: &[Checkpoint]) -> Plan {
        Plan {
            outputs,
            accumulate: Accumulate::F32,
            precision: Accumulate::F64,
            metadata: Default::default(),
        }
    }

    fn out(name: &str, dtype: Option<Dtype>, op: Op) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            dtype,
            op,
        }
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
        let e = err(vec![
            out("x", None, Op::Copy(src(0, "w"))),
            out("x", None, Op::Copy(src(0, "w"))),
        ]);
        assert!(e.contains("'x' appears twice"), "{e}");
    }

    #[test]
    fn error_mean_without_sources() {
        let e = err(vec![out(
            "x",
            None,
            Op::Mean {
                sources: vec![],
                weights: None,
            },
        )]);
        assert!(e.contains("no sources"), "{e}");
    }

    #[test]
    fn error_weights() {
        let e = err(vec![out(
            "x",
            None,
            Op::Mean {
                sources: vec![src(0, "w")],
                weights: Some(vec![0.5, 0.5]),
            },
        )]);
        assert!(e.contains("2 weights for 1 sources"), "{e}");
        let e = err(vec![out(
            "x",
            None,
            Op::Mean {
                sources: vec![src(0, "w")],
                weights: Some(vec![f64::NAN]),
            },
        )]);
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
        let e = err(vec![out(
            "w",
            None,
            Op::Mean {
                sources: vec![src(0, "w"), src(1, "w")],
                weights: None,
            },
        )]);
        assert!(
            e.contains("[2]") && e.contains("[1, 2]") && e.contains("a.safetensors") && e.contains("b.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn error_int_mean_and_conversion() {
        let e = err(vec![out(
            "i",
            None,
            Op::Mean {
                sources: vec![src(0, "i")],
                weights: None,
            },
        )]);
        assert!(e.contains("I64") && e.contains("cannot be averaged"), "{e}");
        let e = err(vec![out("i", Some(Dtype::F16), Op::Copy(src(0, "i")))]);
        assert!(e.contains("cannot convert I64"), "{e}");
        let e = err(vec![out("w", Some(Dtype::I32), Op::Copy(src(0, "w")))]);
        assert!(e.contains("as I32"), "{e}");
    }

    #[test]
    fn error_every_problem_reported_at_once() {
        let e = err(vec![
            out(
                "w",
                None,
                Op::Mean {
                    sources: vec![src(0, "w"), src(1, "w")],
                    weights: None,
                },
            ),
            out("x", None, Op::Copy(src(1, "i"))),
            out(
                "y",
                None,
                Op::Mean {
                    sources: vec![src(0, "i")],
                    weights: None,
                },
            ),
        ]);
        assert!(e.starts_with("3 problems"), "{e}");
        assert!(
            e.contains("[1, 2]") && e.contains("'i': not found") && e.contains("cannot be averaged"),
            "{e}"
        );
    }

    #[test]
    fn layout_and_provenance() {
        let (_d, cks) = setup();
        let p = plan(
            vec![
                out("w", Some(Dtype::F32), Op::Copy(src(0, "w"))),
                out("i", None, Op::Copy(src(0, "i"))),
            ],
            &cks,
        );
        let l = p.resolve(&cks).unwrap();
        assert_eq!(
            (l.tensors[0].out_offset, l.tensors[0].out_len, l.tensors[1].out_offset),
            (0, 8, 8)
        );
        assert_eq!(l.data_len, 16);
        assert_eq!(l.bytes_read, 4 + 8);
        let text = String::from_utf8_lossy(&l.header);
        assert!(text.contains("astolfomix.inputs") && text.contains("a.safetensors"), "{text}");
    }
}
