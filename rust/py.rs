//! The Python bindings, all of them: `astolfomix_rs._core`. Everything else in the crate is
//! plain Rust. Heavy work runs with the GIL released; errors become the classes in
//! `astolfomix_rs.errors`; panics never cross into Python.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::checkpoint::{Checkpoint, InputFile};
use crate::dropout::Dropout;
use crate::dtype::Dtype;
use crate::engine::{self, Io, Options, Progress, Report};
use crate::error::Error;
use crate::hashing;
use crate::iso::Iso;
use crate::kernels::Level;
use crate::plan::{Accumulate, Kind, Layout, Op, OutputTensor, Plan, Resolver, Source};
use crate::robust::{Expr, IsoTerm, Median, Method, Robust, Ties};
use crate::writer::{Mode, Writer};

/// Converts a crate error into the matching `astolfomix_rs.errors` exception.
fn to_py(e: Error) -> PyErr {
    if let Error::Cancelled = e {
        return PyKeyboardInterrupt::new_err(e.to_string());
    }
    Python::attach(|py| {
        let msg = e.to_string();
        match py
            .import("astolfomix_rs.errors")
            .and_then(|m| m.getattr(e.kind()))
            .and_then(|c| c.call1((msg,)))
        {
            Ok(inst) => PyErr::from_value(inst),
            Err(err) => err,
        }
    })
}

/// A `PlanError` carrying `msg`: bad arguments from Python are plan errors, not bare ValueErrors.
fn plan_err(msg: impl Into<String>) -> PyErr {
    to_py(Error::Plan(msg.into()))
}

fn parse_dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(&s.to_ascii_uppercase()).ok_or_else(|| plan_err(format!("unknown dtype '{s}'")))
}

fn parse_accumulate(s: &str) -> PyResult<Accumulate> {
    match s {
        "f32" => Ok(Accumulate::F32),
        "f64" => Ok(Accumulate::F64),
        a => Err(plan_err(format!("accumulate must be 'f32' or 'f64', not '{a}'"))),
    }
}

/// `pread`s `out`'s length of bytes at `offset` of `file` into `out` (a writable, C-contiguous
/// buffer such as a numpy array), GIL released. Python reads inputs this way, never through
/// the map: a file truncated meanwhile is an error naming it, not a SIGBUS.
fn read_into(py: Python<'_>, file: &InputFile, offset: usize, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let buf = PyBuffer::<u8>::get(out)?;
    if buf.readonly() || !buf.is_c_contiguous() {
        return Err(PyBufferError::new_err("read_into needs a writable, C-contiguous byte buffer"));
    }
    let (ptr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
    if offset.checked_add(len).is_none_or(|end| end as u64 > file.file_len) {
        return Err(plan_err(format!(
            "bytes {offset}..+{len} lie outside {}",
            file.path.display()
        )));
    }
    py.detach(|| {
        // SAFETY: `buf` keeps the exporter and its memory alive until it drops after this call;
        // the buffer was checked writable and contiguous, `len` bytes long.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
        file.read_at(offset, dst)
    })
    .map_err(to_py)
}

/// An open, validated safetensors file. Python reads its bytes with `read_into` (`pread`).
#[pyclass(name = "Checkpoint", module = "astolfomix_rs._core", frozen)]
struct PyCheckpoint(Checkpoint);

#[pymethods]
impl PyCheckpoint {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        py.detach(|| Checkpoint::open(&path)).map(PyCheckpoint).map_err(to_py)
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }

    #[getter]
    fn file_len(&self) -> u64 {
        self.0.file.file_len
    }

    #[getter]
    fn data_start(&self) -> usize {
        self.0.header.data_start
    }

    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.0.header.metadata.clone()
    }

    /// `[(name, dtype, shape, file_offset, nbytes)]` in header order.
    fn tensors(&self) -> Vec<(String, &'static str, Vec<usize>, usize, usize)> {
        let s = self.0.header.data_start;
        self.0
            .header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.name(), t.shape.clone(), s + t.begin, t.end - t.begin))
            .collect()
    }

    fn __len__(&self) -> usize {
        self.0.header.tensors.len()
    }

    /// Fills `out` with the file's bytes at `offset` (see [`read_into`]).
    fn read_into(&self, py: Python<'_>, offset: usize, out: &Bound<'_, PyAny>) -> PyResult<()> {
        read_into(py, &self.0.file, offset, out)
    }
}

/// One input of a resolved plan (for the torch path), read with `read_into`.
#[pyclass(name = "InputFile", module = "astolfomix_rs._core", frozen)]
struct PyInputFile(Arc<InputFile>);

#[pymethods]
impl PyInputFile {
    #[getter]
    fn path(&self) -> PathBuf {
        self.0.path.clone()
    }

    /// Fills `out` with the file's bytes at `offset` (see [`read_into`]).
    fn read_into(&self, py: Python<'_>, offset: usize, out: &Bound<'_, PyAny>) -> PyResult<()> {
        read_into(py, &self.0, offset, out)
    }
}

/// Bytes lent by a Python object (a numpy array) for a constant tensor, without a copy.
struct Lent {
    buf: PyBuffer<u8>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer was checked C-contiguous when lent; `PyBuffer` keeps the exporter
        // and its memory alive until this value is dropped. Plans only read it.
        unsafe { std::slice::from_raw_parts(self.buf.buf_ptr() as *const u8, self.buf.len_bytes()) }
    }
}

/// Builds a plan from its Python form: outputs are `(name, dtype|None, op, [(input, key)],
/// weights|None, data|None, shape|None)` with op `copy`, `cast`, `mean` or `constant` (see
/// `astolfomix_rs.core.plan.Output.as_core`). Key names are interned: a merge of N models names
/// each key N times, and this keeps one copy.
fn plan_from_py(
    outputs: &Bound<'_, PyList>,
    accumulate: &str,
    precision: &str,
    metadata: BTreeMap<String, String>,
) -> PyResult<Plan> {
    let accumulate = parse_accumulate(accumulate)?;
    let precision =
        parse_accumulate(precision).map_err(|_| plan_err(format!("precision must be 'f32' or 'f64', not '{precision}'")))?;
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    let mut exprs: HashMap<usize, Arc<Expr>> = HashMap::new();
    let outputs = outputs
        .iter()
        .map(|item| output_from_py(&item, &mut names, &mut exprs))
        .collect::<PyResult<_>>()?;
    Ok(Plan {
        outputs,
        accumulate,
        precision,
        metadata,
    })
}

/// One output in its Python form (see [`plan_from_py`]). An expression object shared by several
/// outputs (a recipe's keys have one shape) becomes one shared [`Expr`]: the plan then grows with
/// N once, not once per key. `exprs` is keyed by the object's address, valid while `outputs`
/// holds it.
fn output_from_py(
    item: &Bound<'_, PyAny>,
    names: &mut HashMap<String, Arc<str>>,
    exprs: &mut HashMap<usize, Arc<Expr>>,
) -> PyResult<OutputTensor> {
    type Entry<'py> = (
        String,
        Option<String>,
        String,
        Bound<'py, PyList>,
        Option<Vec<f64>>,
        Option<Bound<'py, PyAny>>,
        Option<Vec<usize>>,
        Option<Bound<'py, PyAny>>,
    );
    let (name, dtype, op, srcs, weights, data, shape, expr): Entry<'_> = item.extract()?;
    let dtype = dtype.map(|d| parse_dtype(&d)).transpose()?;
    let mut sources = Vec::with_capacity(srcs.len());
    for s in srcs.iter() {
        let (input, key): (usize, Bound<'_, PyString>) = s.extract()?;
        let key = key.to_str()?;
        let tensor = match names.get(key) {
            Some(a) => a.clone(),
            None => names.entry(key.to_string()).or_insert_with(|| Arc::from(key)).clone(),
        };
        sources.push(Source { input, tensor });
    }
    let one = |mut sources: Vec<Source>| {
        if sources.len() == 1 {
            Ok(sources.remove(0))
        } else {
            Err(plan_err(format!("{op} '{name}' needs exactly one source")))
        }
    };
    let op = match op.as_str() {
        "copy" => Op::Copy(one(sources)?),
        "cast" => Op::Cast(one(sources)?),
        "mean" => Op::Mean { sources, weights },
        "expr" => {
            let expr = expr.ok_or_else(|| plan_err(format!("expression '{name}' has no expression")))?;
            let expr = match exprs.get(&(expr.as_ptr() as usize)) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(expr_from_py(&expr).map_err(|e| plan_err(format!("'{name}': {e}")))?);
                    exprs.insert(expr.as_ptr() as usize, e.clone());
                    e
                }
            };
            Op::Expr { sources, expr }
        }
        "constant" => {
            let data = data.ok_or_else(|| plan_err(format!("constant '{name}' has no data")))?;
            let buf = PyBuffer::<u8>::get(&data)?;
            if !buf.is_c_contiguous() {
                return Err(plan_err(format!("constant '{name}': data must be C-contiguous bytes")));
            }
            let op = Op::Constant {
                dtype: dtype.ok_or_else(|| plan_err(format!("constant '{name}' needs its dtype")))?,
                shape: shape.ok_or_else(|| plan_err(format!("constant '{name}' needs its shape")))?,
                data: Arc::new(Lent { buf }),
            };
            return Ok(OutputTensor { name, dtype: None, op });
        }
        o => return Err(plan_err(format!("unknown op '{o}' for '{name}'"))),
    };
    Ok(OutputTensor { name, dtype, op })
}

type PyTerms = Vec<(usize, f64)>;
type PyRobust = (f64, String, HashMap<String, f64>, Vec<PyTerms>);

/// An expression in its Python form: `(linear, [(coefficient, method, {param: value}, [points])],
/// [(coefficient, {z_cof, apply_exp, apply_high_dim}, inner expression)])` (the last list may be
/// left out), each point a list of `(source, coefficient)`; booleans as 0/1.
fn expr_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Expr> {
    let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
    if !(2..=3).contains(&items.len()) {
        return Err(plan_err("an expression is (linear, robust terms[, isotropic terms])"));
    }
    let linear: PyTerms = items[0].extract()?;
    let robust: Vec<PyRobust> = items[1].extract()?;
    let robust = robust
        .into_iter()
        .map(|(a, method, params, points)| robust_from_py(&method, &params, points).map(|r| (a, r)))
        .collect::<PyResult<_>>()?;
    let mut iso = Vec::new();
    if let Some(list) = items.get(2) {
        let terms: Vec<(f64, HashMap<String, f64>, Bound<'_, PyAny>)> = list.extract()?;
        for (coef, p, inner) in terms {
            if let Some(bad) = p
                .keys()
                .find(|k| !["z_cof", "apply_exp", "apply_high_dim"].contains(&k.as_str()))
            {
                return Err(plan_err(format!("isotropic has no parameter '{bad}'")));
            }
            let get = |k: &str, d: f64| p.get(k).copied().unwrap_or(d);
            iso.push(IsoTerm {
                coef,
                iso: Iso {
                    z: get("z_cof", 0.0),
                    exp: get("apply_exp", 0.0) != 0.0,
                    high_dim: get("apply_high_dim", 0.0) != 0.0,
                },
                inner: expr_from_py(&inner)?,
            });
        }
    }
    Ok(Expr { linear, robust, iso })
}

/// A robust node from its method name and parameters; `p` (drop probability), `della_eps`,
/// `rank_rows` and `seed` add DARE / DELLA masks before any method.
fn robust_from_py(name: &str, params: &HashMap<String, f64>, points: Vec<PyTerms>) -> PyResult<Robust> {
    const DROP: [&str; 4] = ["p", "della_eps", "rank_rows", "seed"];
    let mut p = params.clone();
    let drop: HashMap<String, f64> = DROP.iter().filter_map(|k| p.remove(*k).map(|v| (k.to_string(), v))).collect();
    let dropout = if drop.contains_key("p") || name == "masked_mean" {
        let seed = drop.get("seed").copied().unwrap_or(0.0);
        if !(0.0..=9_007_199_254_740_992.0).contains(&seed) || seed.fract() != 0.0 {
            return Err(plan_err(format!("seed must be a whole number from 0 to 2^53, not {seed}")));
        }
        Some(Dropout {
            p: drop.get("p").copied().unwrap_or(0.0),
            della_eps: drop.get("della_eps").copied().unwrap_or(0.0),
            rows: drop.get("rank_rows").copied().unwrap_or(0.0) != 0.0,
            seed: seed as u64,
        })
    } else if let Some(k) = drop.keys().next() {
        return Err(plan_err(format!("{name}: '{k}' needs a drop probability 'p'")));
    } else {
        None
    };
    let method = if name == "masked_mean" {
        if let Some(bad) = p.keys().next() {
            return Err(plan_err(format!("masked_mean has no parameter '{bad}'")));
        }
        Method::MaskedMean
    } else {
        method_from_py(name, &p)?
    };
    Ok(Robust { points, method, dropout })
}

fn method_from_py(name: &str, p: &HashMap<String, f64>) -> PyResult<Method> {
    let allowed: &[&str] = match name {
        "ties_sum" => &["k", "vote_mass"],
        "ties_stock" => &["k", "vote_mass", "cos_eps"],
        "ties_median" => &["k", "vote_mass", "eps", "maxiter", "ftol"],
        "geometric_median" => &["eps", "maxiter", "ftol"],
        "model_stock" => &["cos_eps", "whole"],
        other => return Err(plan_err(format!("unknown robust method '{other}'"))),
    };
    if let Some(bad) = p.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(plan_err(format!(
            "{name} has no parameter '{bad}' (it takes {})",
            allowed.join(", ")
        )));
    }
    let get = |k: &str, d: f64| p.get(k).copied().unwrap_or(d);
    let ties = Ties {
        k: get("k", 1.0),
        vote_mass: get("vote_mass", 0.0) != 0.0,
    };
    let maxiter = get("maxiter", 100.0);
    if !(0.0..=100_000.0).contains(&maxiter) || maxiter.fract() != 0.0 {
        return Err(plan_err(format!(
            "maxiter must be a whole number from 0 to 100000, not {maxiter}"
        )));
    }
    let median = Median {
        eps: get("eps", 1e-6),
        maxiter: maxiter as usize,
        ftol: get("ftol", 1e-20),
    };
    let cos_eps = get("cos_eps", 1e-6);
    Ok(match name {
        "ties_sum" => Method::TiesSum(ties),
        "ties_stock" => Method::TiesStock { ties, cos_eps },
        "ties_median" => Method::TiesMedian { ties, median },
        "geometric_median" => Method::GeometricMedian(median),
        _ => Method::ModelStock {
            cos_eps,
            whole: get("whole", 0.0) != 0.0,
        },
    })
}

/// Resolves a plan against opened checkpoints, one at a time: `add` each input (the caller may
/// drop its parsed header right after), then `finish`.
#[pyclass(name = "Resolver", module = "astolfomix_rs._core", frozen)]
struct PyResolver(Mutex<Option<Resolver>>);

#[pymethods]
impl PyResolver {
    #[new]
    #[pyo3(signature = (outputs, n_inputs, *, accumulate="f32", precision="f64"))]
    fn new(outputs: &Bound<'_, PyList>, n_inputs: usize, accumulate: &str, precision: &str) -> PyResult<Self> {
        let plan = plan_from_py(outputs, accumulate, precision, BTreeMap::new())?;
        Resolver::new(plan, n_inputs)
            .map(|r| PyResolver(Mutex::new(Some(r))))
            .map_err(to_py)
    }

    /// Locates every source that reads from input `input`.
    fn add(&self, input: usize, checkpoint: &Bound<'_, PyCheckpoint>) -> PyResult<()> {
        let mut g = self.0.lock().map_err(|_| PyRuntimeError::new_err("resolver lock poisoned"))?;
        let r = g.as_mut().ok_or_else(|| plan_err("the resolver is already finished"))?;
        r.add(input, &checkpoint.get().0).map_err(to_py)
    }

    /// The resolved plan, with `metadata` for the output header.
    #[pyo3(signature = (metadata=BTreeMap::new()))]
    fn finish(&self, metadata: BTreeMap<String, String>) -> PyResult<PyLayout> {
        let r = self
            .0
            .lock()
            .map_err(|_| PyRuntimeError::new_err("resolver lock poisoned"))?
            .take();
        let mut r = r.ok_or_else(|| plan_err("the resolver is already finished"))?;
        r.set_metadata(metadata);
        r.finish().map(|l| PyLayout(Arc::new(l))).map_err(to_py)
    }
}

/// A resolved plan: everything an executor needs, and the inputs it reads.
#[pyclass(name = "Layout", module = "astolfomix_rs._core", frozen)]
struct PyLayout(Arc<Layout>);

#[pymethods]
impl PyLayout {
    /// The output header, length prefix included.
    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.header)
    }

    #[getter]
    fn data_len(&self) -> usize {
        self.0.data_len
    }

    #[getter]
    fn bytes_read(&self) -> u64 {
        self.0.bytes_read
    }

    fn __len__(&self) -> usize {
        self.0.tensors.len()
    }

    /// Input `i` (read it with `read_into`).
    fn input(&self, i: usize) -> PyResult<PyInputFile> {
        self.0
            .inputs
            .get(i)
            .map(|f| PyInputFile(f.clone()))
            .ok_or_else(|| plan_err(format!("no input #{i}")))
    }

    #[getter]
    fn n_inputs(&self) -> usize {
        self.0.inputs.len()
    }

    /// `[(name, dtype, shape, numel, out_offset, out_len, op, [(input, dtype, offset)], weights,
    /// via)]`: op is `copy` (the stored bytes), `cast`, `mean` or `constant` (see `constant(i)`);
    /// via is the working precision (`f32`/`f64`) of casts, means and robust expressions.
    #[allow(clippy::type_complexity)]
    fn tensors(
        &self,
    ) -> Vec<(
        &str,
        &'static str,
        Vec<usize>,
        usize,
        usize,
        usize,
        &'static str,
        Vec<(usize, &'static str, usize)>,
        Option<Vec<f64>>,
        Option<&'static str>,
    )> {
        self.0
            .tensors
            .iter()
            .map(|t| {
                let srcs = t.kind.sources().iter().map(|r| (r.input, r.dtype.name(), r.offset)).collect();
                let (weights, via) = match &t.kind {
                    Kind::Mean { weights, via, .. } => (weights.clone(), Some(via.name())),
                    Kind::Cast { via, .. } | Kind::Expr { via, .. } => (None, Some(via.name())),
                    _ => (None, None),
                };
                (
                    t.name.as_str(),
                    t.dtype.name(),
                    t.shape.clone(),
                    t.numel,
                    t.out_offset,
                    t.out_len,
                    t.kind.name(),
                    srcs,
                    weights,
                    via,
                )
            })
            .collect()
    }

    /// The bytes of constant tensor `i`.
    fn constant<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyBytes>> {
        match self.0.tensors.get(i).map(|t| &t.kind) {
            Some(Kind::Constant(d)) => Ok(PyBytes::new(py, (**d).as_ref())),
            _ => Err(plan_err(format!("tensor #{i} is not a constant"))),
        }
    }
}

fn write_mode(overwrite: bool, in_place: Option<usize>) -> Mode {
    match (in_place, overwrite) {
        (Some(i), _) => Mode::InPlace(i),
        (None, true) => Mode::Overwrite,
        (None, false) => Mode::Create,
    }
}

fn level_from_py(kernel: Option<&str>) -> PyResult<Option<Level>> {
    let Some(k) = kernel else { return Ok(None) };
    let want = Level::available()
        .into_iter()
        .find(|l| l.name() == k || format!("{l:?}").eq_ignore_ascii_case(k));
    want.map(Some)
        .ok_or_else(|| plan_err(format!("kernel '{k}' is not available on this CPU")))
}

fn report_to_py<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("output", r.output.clone())?;
    d.set_item("tensors", r.tensors)?;
    d.set_item("bytes_read", r.bytes_read)?;
    d.set_item("bytes_written", r.bytes_written)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("threads", r.threads)?;
    d.set_item("kernel", r.kernel)?;
    Ok(d)
}

/// Runs the work on a helper thread while this one (GIL released) wakes every 100 ms to feed
/// `progress(done, total)` and to check for Ctrl-C, which cancels the run within a second.
fn run_watched<T: Send>(
    py: Python<'_>,
    callback: Option<Py<PyAny>>,
    progress: &Progress,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let handle = s.spawn(move || {
                let r = work();
                let _ = tx.send(());
                r
            });
            let mut interrupt: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                if interrupt.is_some() {
                    continue;
                }
                let res = Python::attach(|py| -> PyResult<()> {
                    py.check_signals()?;
                    if let Some(cb) = &callback {
                        cb.call1(
                            py,
                            (progress.done.load(Ordering::Relaxed), progress.total.load(Ordering::Relaxed)),
                        )?;
                    }
                    Ok(())
                });
                if let Err(e) = res {
                    progress.cancel.store(true, Ordering::Relaxed);
                    interrupt = Some(e);
                }
            }
            let result = handle
                .join()
                .map_err(|_| PyRuntimeError::new_err("internal error: the engine panicked; no output was written"))?;
            if let Some(e) = interrupt {
                return Err(e);
            }
            result.map_err(to_py)
        })
    })
}

/// Executes a resolved plan on the CPU and writes `output` atomically. Returns the report.
#[pyfunction]
#[pyo3(signature = (layout, output, *, threads=None, chunk=None, kernel=None, io="auto", durable=true, overwrite=false, in_place=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn execute<'py>(
    py: Python<'py>,
    layout: &Bound<'py, PyLayout>,
    output: PathBuf,
    threads: Option<usize>,
    chunk: Option<usize>,
    kernel: Option<&str>,
    io: &str,
    durable: bool,
    overwrite: bool,
    in_place: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let io = match io {
        "pread" => Io::Pread,
        "mmap" => Io::Mmap,
        "auto" => Io::Auto,
        other => return Err(plan_err(format!("io must be 'auto', 'pread' or 'mmap', not '{other}'"))),
    };
    let layout = layout.get().0.clone();
    let opts = Options {
        threads: threads.filter(|&t| t > 0),
        chunk: chunk.unwrap_or(Options::default().chunk),
        level: level_from_py(kernel)?,
        io,
        durable,
        mode: write_mode(overwrite, in_place),
    };
    let prog = Progress::default();
    let report = run_watched(py, progress, &prog, || engine::run_layout(&layout, &output, &opts, &prog))?;
    report_to_py(py, &report)
}

/// The streaming atomic writer, for executors written in Python (the torch path).
#[pyclass(name = "Writer", module = "astolfomix_rs._core", frozen)]
struct PyWriter(RwLock<Option<Writer>>);

#[pymethods]
impl PyWriter {
    /// Creates the temporary file for `layout`'s output at `path` and writes its header.
    #[new]
    #[pyo3(signature = (layout, path, *, overwrite=false, in_place=None))]
    fn new(
        py: Python<'_>,
        layout: &Bound<'_, PyLayout>,
        path: PathBuf,
        overwrite: bool,
        in_place: Option<usize>,
    ) -> PyResult<Self> {
        let layout = layout.get().0.clone();
        py.detach(|| {
            Writer::create(
                &path,
                &layout.header,
                layout.data_len as u64,
                &layout.identities(),
                write_mode(overwrite, in_place),
            )
        })
        .map(|w| PyWriter(RwLock::new(Some(w))))
        .map_err(to_py)
    }

    /// Writes a C-contiguous buffer at `offset` within the data section (GIL released).
    fn write(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(plan_err("buffer must be C-contiguous"));
        }
        let (ptr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        py.detach(|| {
            // SAFETY: `buf` holds the exporter's buffer alive and C-contiguous for `len` bytes
            // until it is dropped after this closure; nothing here mutates it.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            let guard = self.0.read().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?;
            let w = guard.as_ref().ok_or_else(|| plan_err("writer is already closed"))?;
            w.write_at(offset, bytes).map_err(to_py)
        })
    }

    /// fsync (when durable) and rename into place.
    #[pyo3(signature = (durable=true))]
    fn commit(&self, py: Python<'_>, durable: bool) -> PyResult<()> {
        let w = self
            .0
            .write()
            .map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?
            .take();
        let w = w.ok_or_else(|| plan_err("writer is already closed"))?;
        py.detach(|| w.commit(durable)).map_err(to_py)
    }

    /// Removes the temporary file; the target is left as it was.
    fn abort(&self) -> PyResult<()> {
        drop(
            self.0
                .write()
                .map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?
                .take(),
        );
        Ok(())
    }

    #[getter]
    fn written(&self) -> PyResult<u64> {
        let g = self.0.read().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?;
        Ok(g.as_ref().map_or(0, |w| w.written()))
    }
}

fn handles<'a>(cks: &'a [Bound<'_, PyCheckpoint>]) -> Vec<&'a Checkpoint> {
    cks.iter().map(|c| &c.get().0).collect()
}

/// Every output this process has committed (renamed into place) so far.
#[pyfunction]
fn committed() -> Vec<PathBuf> {
    crate::writer::committed()
}

/// A temp path beside `target`, named as the writer names its own (owner pid included).
#[pyfunction]
fn temp_path(target: PathBuf) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(crate::writer::tmp_name(&name))
}

/// Bytes stored for `keys` of `ck` (the total a progress bar counts toward); unknown keys count 0.
fn key_bytes<'a>(ck: &Checkpoint, keys: impl Iterator<Item = &'a String>) -> u64 {
    keys.filter_map(|k| ck.get(k).map(|t| (t.end - t.begin) as u64)).sum()
}

/// Removes temp files in `folder` left by runs whose process is gone; returns `[(path, bytes)]`.
#[pyfunction]
fn clean_stale(py: Python<'_>, folder: PathBuf) -> PyResult<Vec<(PathBuf, u64)>> {
    py.detach(|| crate::writer::clean_stale(&folder)).map_err(to_py)
}

/// AutoV1/V2/V3 of each open file, files in parallel, each read once (GIL released).
/// `progress(done, total)` is called with bytes read, about every 100 ms; Ctrl-C stops it.
#[pyfunction]
#[pyo3(signature = (checkpoints, progress=None))]
fn file_hashes(
    py: Python<'_>,
    checkpoints: Vec<Bound<'_, PyCheckpoint>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<BTreeMap<&'static str, String>>> {
    use rayon::prelude::*;
    let cks = handles(&checkpoints);
    let p = Progress::default();
    p.total.store(cks.iter().map(|c| c.file.file_len).sum(), Ordering::Relaxed);
    let res = run_watched(py, progress, &p, || {
        cks.par_iter()
            .map(|c| hashing::file_hashes(c, &p))
            .collect::<crate::Result<Vec<_>>>()
    })?;
    Ok(res
        .into_iter()
        .map(|h| BTreeMap::from([("sha256", h.sha256), ("autov1", h.autov1), ("autov3", h.autov3)]))
        .collect())
}

/// Content hash of each named group of `(canonical name, key)` entries of one open file.
#[pyfunction]
#[pyo3(signature = (checkpoint, groups, progress=None))]
fn content_hashes(
    py: Python<'_>,
    checkpoint: &Bound<'_, PyCheckpoint>,
    groups: BTreeMap<String, Vec<(String, String)>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<BTreeMap<String, String>> {
    let ck = &checkpoint.get().0;
    let p = Progress::default();
    p.total
        .store(key_bytes(ck, groups.values().flatten().map(|(_, k)| k)), Ordering::Relaxed);
    run_watched(py, progress, &p, || {
        groups
            .iter()
            .map(|(g, entries)| hashing::content_hash(ck, entries, &p).map(|h| (g.clone(), h)))
            .collect::<crate::Result<BTreeMap<_, _>>>()
    })
}

/// The model-toolkit statistic `sum(sigmoid(fp16(x)) - 0.5)` of each key.
#[pyfunction]
#[pyo3(signature = (checkpoint, keys, progress=None))]
fn sigmoid_sums(
    py: Python<'_>,
    checkpoint: &Bound<'_, PyCheckpoint>,
    keys: Vec<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<f64>> {
    let ck = &checkpoint.get().0;
    let p = Progress::default();
    p.total.store(key_bytes(ck, keys.iter()), Ordering::Relaxed);
    run_watched(py, progress, &p, || hashing::sigmoid_sums(ck, &keys, &p))
}

/// Per file `(sum (x - r)^2, sum r^2)` over `keys`; `r` = file `reference`, or the mean of all.
#[pyfunction]
#[pyo3(signature = (checkpoints, keys, reference=None, progress=None))]
fn l2_distances(
    py: Python<'_>,
    checkpoints: Vec<Bound<'_, PyCheckpoint>>,
    keys: Vec<String>,
    reference: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<(f64, f64)>> {
    if reference.is_some_and(|r| r >= checkpoints.len()) {
        return Err(plan_err("reference index out of range"));
    }
    let cks = handles(&checkpoints);
    let p = Progress::default();
    p.total
        .store(cks.iter().map(|c| key_bytes(c, keys.iter())).sum(), Ordering::Relaxed);
    run_watched(py, progress, &p, || hashing::l2_distances(&cks, &keys, reference, &p))
}

/// The robust executors' shared steps, so the torch path cuts the same blocks and takes the same
/// Weiszfeld steps as the engine: elements per block (`rust/robust.rs` `block_len`).
#[pyfunction]
fn robust_block_len(points: usize, row: usize, rows: bool) -> usize {
    crate::robust::block_len(points, row, rows)
}

/// n for an n x n Gram matrix given as its n*n values.
fn gram_side(gram: &[f64]) -> PyResult<usize> {
    let n = (gram.len() as f64).sqrt() as usize;
    if n * n != gram.len() {
        return Err(plan_err(format!("a Gram matrix needs n*n values, not {}", gram.len())));
    }
    Ok(n)
}

/// Geometric-median weights from an n x n Gram matrix (row-major), Weiszfeld as the engine runs it.
#[pyfunction]
fn robust_weiszfeld(gram: Vec<f64>, eps: f64, maxiter: usize, ftol: f64) -> PyResult<Vec<f64>> {
    let n = gram_side(&gram)?;
    Ok(crate::robust::weiszfeld(&gram, n, Median { eps, maxiter, ftol }))
}

/// The whole-tensor model stock factor from an n x n Gram matrix (row-major).
#[pyfunction]
fn robust_whole_stock(gram: Vec<f64>, cos_eps: f64) -> PyResult<f64> {
    let n = gram_side(&gram)?;
    Ok(crate::robust::whole_stock(&gram, n, cos_eps))
}

fn f64_values(py: Python<'_>, values: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    let buf = PyBuffer::<f64>::get(values)?;
    buf.to_vec(py)
}

/// The estimated DELLA ordinal ranks (1..n, float64 bytes) of every element of one point's whole
/// tensor (float64 values), as the engine estimates them for a weight `della_eps`; `None` where
/// the tensor holds a NaN (no rank term).
#[pyfunction]
fn robust_ranks<'py>(py: Python<'py>, values: &Bound<'py, PyAny>, della_eps: f64) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let v = f64_values(py, values)?;
    let ranks = py.detach(|| {
        let wanted: Vec<u64> = (0..v.len() as u64).collect();
        crate::dropout::ranks_of(&v, della_eps, &wanted)
    });
    Ok(ranks.map(|r| le_bytes(py, r.iter().map(|x| x.to_le_bytes()))))
}

/// Eight-byte little-endian values as one bytes object.
fn le_bytes<'py>(py: Python<'py>, words: impl Iterator<Item = [u8; 8]>) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &words.flatten().collect::<Vec<u8>>())
}

/// Dropout parameters, checked (a clear error instead of a mask of nonsense).
fn checked_dropout(p: f64, della_eps: f64, rows: bool, seed: u64) -> PyResult<Dropout> {
    let d = Dropout {
        p,
        della_eps,
        rows,
        seed,
    };
    d.check().map_err(plan_err)?;
    Ok(d)
}

/// The keep mask of one point's whole tensor (float64 values) with tensor-wide DELLA ranks, as
/// the engine draws it (model `model` at `key`): bits, little-endian 64-bit words (bit `j % 64`
/// of word `j / 64` is element `j`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn robust_della_bits<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    seed: u64,
    key: &str,
    model: usize,
    p: f64,
    della_eps: f64,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = checked_dropout(p, della_eps, false, seed)?;
    let v = f64_values(py, values)?;
    let bits = py.detach(|| crate::dropout::della_bits(&v, crate::dropout::stream(seed, key, model), &d));
    Ok(le_bytes(py, bits.iter().map(|w| w.to_le_bytes())))
}

/// The keep mask (float64 0/1, as bytes) of one point's elements `start..start + len(values)` at
/// `key`, drawn as the engine draws it: model `model` of a node with drop probability `p`, DARE
/// or DELLA with ranks within rows (tensor-wide ranks: [`robust_della_bits`]).
#[pyfunction]
#[pyo3(signature = (values, start, seed, key, model, p, della_eps=0.0, rank_rows=false, row=1))]
#[allow(clippy::too_many_arguments)]
fn robust_mask<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    start: usize,
    seed: u64,
    key: &str,
    model: usize,
    p: f64,
    della_eps: f64,
    rank_rows: bool,
    row: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = checked_dropout(p, della_eps, rank_rows, seed)?;
    if della_eps != 0.0 && !rank_rows {
        return Err(plan_err(
            "tensor-wide DELLA ranks need the whole tensor: use robust_della_bits",
        ));
    }
    let v = f64_values(py, values)?;
    let ranks = if rank_rows {
        crate::dropout::Ranks::Rows(row.max(1))
    } else {
        crate::dropout::Ranks::None
    };
    let mut m = Vec::new();
    crate::dropout::mask(&mut m, &v, start, crate::dropout::stream(seed, key, model), &d, ranks);
    Ok(le_bytes(py, m.iter().map(|x| x.to_le_bytes())))
}

/// The mask generator's name and version (recorded in outputs).
#[pyfunction]
fn mask_generator() -> &'static str {
    crate::dropout::GENERATOR
}

/// The dtype table both languages use: `[(name, bits, averageable)]`.
#[pyfunction]
fn dtypes() -> Vec<(&'static str, usize, bool)> {
    Dtype::all()
        .iter()
        .map(|d| (d.name(), d.bits(), d.is_averageable()))
        .collect()
}

/// Every exception class name the core raises (`astolfomix_rs.errors` must have each).
#[pyfunction]
fn error_kinds() -> Vec<&'static str> {
    Error::KINDS.to_vec()
}

/// How many checkpoints this process has opened (and headers parsed) so far.
#[pyfunction]
fn open_count() -> u64 {
    crate::checkpoint::open_count()
}

/// Names of the kernel levels this CPU can run, best last.
#[pyfunction]
fn kernels() -> Vec<&'static str> {
    Level::available().into_iter().map(Level::name).collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<PyInputFile>()?;
    m.add_class::<PyResolver>()?;
    m.add_class::<PyLayout>()?;
    m.add_class::<PyWriter>()?;
    m.add_function(wrap_pyfunction!(execute, m)?)?;
    m.add_function(wrap_pyfunction!(kernels, m)?)?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(robust_block_len, m)?)?;
    m.add_function(wrap_pyfunction!(robust_weiszfeld, m)?)?;
    m.add_function(wrap_pyfunction!(robust_whole_stock, m)?)?;
    m.add_function(wrap_pyfunction!(robust_ranks, m)?)?;
    m.add_function(wrap_pyfunction!(robust_della_bits, m)?)?;
    m.add_function(wrap_pyfunction!(robust_mask, m)?)?;
    m.add_function(wrap_pyfunction!(mask_generator, m)?)?;
    m.add_function(wrap_pyfunction!(error_kinds, m)?)?;
    m.add_function(wrap_pyfunction!(open_count, m)?)?;
    m.add_function(wrap_pyfunction!(file_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(committed, m)?)?;
    m.add_function(wrap_pyfunction!(clean_stale, m)?)?;
    m.add_function(wrap_pyfunction!(temp_path, m)?)?;
    m.add_function(wrap_pyfunction!(content_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(sigmoid_sums, m)?)?;
    m.add_function(wrap_pyfunction!(l2_distances, m)?)?;
    Ok(())
}
