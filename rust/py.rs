//! The Python bindings, all of them: `astolfomix_rs._core`. Everything else in the crate is
//! plain Rust. Heavy work runs with the GIL released; errors become the classes in
//! `astolfomix_rs.errors`; panics never cross into Python.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, RwLock};
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::engine::{self, Io, Options, Progress, Report};
use crate::error::Error;
use crate::hashing;
use crate::kernels::Level;
use crate::plan::{Accumulate, Kind, Op, OutputTensor, Plan, Source};
use crate::writer::Writer;

/// Converts a crate error into the matching `astolfomix_rs.errors` exception.
fn to_py(e: Error) -> PyErr {
    if let Error::Cancelled = e {
        return PyKeyboardInterrupt::new_err(e.to_string());
    }
    Python::attach(|py| {
        let msg = e.to_string();
        match py.import("astolfomix_rs.errors").and_then(|m| m.getattr(e.kind())).and_then(|c| c.call1((msg,))) {
            Ok(inst) => PyErr::from_value(inst),
            Err(err) => err,
        }
    })
}

fn parse_dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(&s.to_ascii_uppercase()).ok_or_else(|| PyValueError::new_err(format!("unknown dtype '{s}'")))
}

/// An open, validated, memory-mapped safetensors file. Its buffer is the whole file (read-only),
/// so numpy views of its tensors cost no copy.
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
        self.0.path.clone()
    }

    #[getter]
    fn file_len(&self) -> u64 {
        self.0.file_len
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

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("checkpoints are read-only"));
        }
        let (ptr, len) = {
            let data = slf.get().0.bytes();
            (data.as_ptr(), data.len())
        };
        // SAFETY: `view` is non-null and owned by the caller for this call. `obj` holds a strong
        // reference to the checkpoint, so the mapping outlives every view of it. The format is
        // a static C string, shape/strides point into the view itself.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len as isize;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Builds a plan from its Python form: outputs are `(name, dtype|None, "copy"|"mean",
/// [(input, key)], weights|None)` (see `astolfomix_rs.plan.Output.as_core`). Key names are
/// interned: a merge of N models names each key N times, and this keeps one copy.
fn plan_from_py(
    inputs: Vec<PathBuf>,
    outputs: &Bound<'_, PyList>,
    accumulate: &str,
    metadata: BTreeMap<String, String>,
) -> PyResult<Plan> {
    let accumulate = match accumulate {
        "f32" => Accumulate::F32,
        "f64" => Accumulate::F64,
        a => return Err(PyValueError::new_err(format!("accumulate must be 'f32' or 'f64', not '{a}'"))),
    };
    let mut names: std::collections::HashMap<String, Arc<str>> = std::collections::HashMap::new();
    let mut outs = Vec::with_capacity(outputs.len());
    for item in outputs.iter() {
        let (name, dtype, op, srcs, weights): (String, Option<String>, String, Bound<'_, PyList>, Option<Vec<f64>>) =
            item.extract()?;
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
        let op = match op.as_str() {
            "copy" if sources.len() == 1 => Op::Copy(sources.remove(0)),
            "copy" => return Err(PyValueError::new_err(format!("copy '{name}' needs exactly one source"))),
            "mean" => Op::Mean { sources, weights },
            o => return Err(PyValueError::new_err(format!("unknown op '{o}' for '{name}'"))),
        };
        outs.push(OutputTensor { name, dtype, op });
    }
    Ok(Plan {
        inputs,
        outputs: outs,
        accumulate,
        metadata,
    })
}

fn level_from_py(kernel: Option<&str>) -> PyResult<Option<Level>> {
    let Some(k) = kernel else { return Ok(None) };
    let want = Level::available().into_iter().find(|l| l.name() == k || format!("{l:?}").eq_ignore_ascii_case(k));
    want.map(Some)
        .ok_or_else(|| PyValueError::new_err(format!("kernel '{k}' is not available on this CPU")))
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
                        cb.call1(py, (progress.done.load(Ordering::Relaxed), progress.total.load(Ordering::Relaxed)))?;
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

/// Executes a plan on the CPU and writes `output` atomically. Returns the report as a dict.
#[pyfunction]
#[pyo3(signature = (inputs, outputs, output, *, accumulate="f32", metadata=BTreeMap::new(), threads=None, chunk=None, kernel=None, io="pread", durable=true, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn execute<'py>(
    py: Python<'py>,
    inputs: Vec<PathBuf>,
    outputs: &Bound<'py, PyList>,
    output: PathBuf,
    accumulate: &str,
    metadata: BTreeMap<String, String>,
    threads: Option<usize>,
    chunk: Option<usize>,
    kernel: Option<&str>,
    io: &str,
    durable: bool,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let t0 = std::time::Instant::now();
    let io = match io {
        "pread" => Io::Pread,
        "mmap" => Io::Mmap,
        other => return Err(PyValueError::new_err(format!("io must be 'pread' or 'mmap', not '{other}'"))),
    };
    let plan = plan_from_py(inputs, outputs, accumulate, metadata)?;
    let (layout, inputs) = py.detach(|| engine::prepare(&plan)).map_err(to_py)?;
    drop(plan);
    let opts = Options {
        threads: threads.filter(|&t| t > 0),
        chunk: chunk.unwrap_or(Options::default().chunk),
        level: level_from_py(kernel)?,
        io,
        durable,
        overwrite,
    };
    let prog = Progress::default();
    let mut report = run_watched(py, progress, &prog, || engine::run_layout(&layout, &inputs, &output, &opts, &prog))?;
    py.detach(|| drop(inputs)); // unmapping is part of the job's time
    report.seconds = t0.elapsed().as_secs_f64();
    report_to_py(py, &report)
}

/// Checks a plan and lays out its output without running it: what the CUDA executor needs.
#[pyfunction]
#[pyo3(signature = (inputs, outputs, *, accumulate="f32", metadata=BTreeMap::new()))]
fn resolve<'py>(
    py: Python<'py>,
    inputs: Vec<PathBuf>,
    outputs: &Bound<'py, PyList>,
    accumulate: &str,
    metadata: BTreeMap<String, String>,
) -> PyResult<Bound<'py, PyDict>> {
    let plan = plan_from_py(inputs, outputs, accumulate, metadata)?;
    let (layout, _inputs) = py.detach(|| engine::prepare(&plan)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("header", PyBytes::new(py, &layout.header))?;
    d.set_item("data_len", layout.data_len)?;
    d.set_item("bytes_read", layout.bytes_read)?;
    let ts = PyList::empty(py);
    for t in &layout.tensors {
        let e = PyDict::new(py);
        e.set_item("name", &t.name)?;
        e.set_item("dtype", t.dtype.name())?;
        e.set_item("shape", &t.shape)?;
        e.set_item("numel", t.numel)?;
        e.set_item("out_offset", t.out_offset)?;
        e.set_item("out_len", t.out_len)?;
        let (op, srcs, weights) = match &t.kind {
            Kind::Copy(r) => ("copy", vec![*r], None),
            Kind::Mean { sources, weights } => ("mean", sources.clone(), weights.clone()),
        };
        e.set_item("op", op)?;
        let s: Vec<(usize, &str, usize)> = srcs.iter().map(|r| (r.input, r.dtype.name(), r.offset)).collect();
        e.set_item("sources", s)?;
        e.set_item("weights", weights)?;
        ts.append(e)?;
    }
    d.set_item("tensors", ts)?;
    Ok(d)
}

/// The streaming atomic writer, for executors written in Python (the CUDA path).
#[pyclass(name = "Writer", module = "astolfomix_rs._core", frozen)]
struct PyWriter(RwLock<Option<Writer>>);

#[pymethods]
impl PyWriter {
    #[new]
    #[pyo3(signature = (path, header, data_len, inputs, *, overwrite=false))]
    fn new(py: Python<'_>, path: PathBuf, header: &[u8], data_len: u64, inputs: Vec<PathBuf>, overwrite: bool) -> PyResult<Self> {
        let header = header.to_vec();
        py.detach(|| {
            use std::os::unix::fs::MetadataExt;
            let ids: Vec<(u64, u64)> = inputs
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino())))
                .collect();
            Writer::create(&path, &header, data_len, &ids, overwrite)
        })
        .map(|w| PyWriter(RwLock::new(Some(w))))
        .map_err(to_py)
    }

    /// Writes a C-contiguous buffer at `offset` within the data section (GIL released).
    fn write(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("buffer must be C-contiguous"));
        }
        let (ptr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        py.detach(|| {
            // SAFETY: `buf` holds the exporter's buffer alive and C-contiguous for `len` bytes
            // until it is dropped after this closure; nothing here mutates it.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            let guard = self.0.read().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?;
            let w = guard.as_ref().ok_or_else(|| PyValueError::new_err("writer is already closed"))?;
            w.write_at(offset, bytes).map_err(to_py)
        })
    }

    /// fsync (when durable) and rename into place.
    #[pyo3(signature = (durable=true))]
    fn commit(&self, py: Python<'_>, durable: bool) -> PyResult<()> {
        let w = self.0.write().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?.take();
        let w = w.ok_or_else(|| PyValueError::new_err("writer is already closed"))?;
        py.detach(|| w.commit(durable)).map_err(to_py)
    }

    /// Removes the temporary file; the target is left as it was.
    fn abort(&self) -> PyResult<()> {
        drop(self.0.write().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?.take());
        Ok(())
    }

    #[getter]
    fn written(&self) -> PyResult<u64> {
        let g = self.0.read().map_err(|_| PyRuntimeError::new_err("writer lock poisoned"))?;
        Ok(g.as_ref().map_or(0, |w| w.written()))
    }
}

/// Lays out a file of `(name, dtype, shape)` entries: `(header bytes, data offsets, data length)`.
#[pyfunction]
#[pyo3(signature = (entries, metadata=BTreeMap::new()))]
fn layout<'py>(
    py: Python<'py>,
    entries: Vec<(String, String, Vec<usize>)>,
    metadata: BTreeMap<String, String>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>, usize)> {
    let mut offsets = Vec::with_capacity(entries.len());
    let mut dtypes = Vec::with_capacity(entries.len());
    let mut pos = 0usize;
    for (name, dtype, shape) in &entries {
        let d = parse_dtype(dtype)?;
        let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let n = numel
            .and_then(|n| d.byte_len(n))
            .ok_or_else(|| PyValueError::new_err(format!("tensor '{name}': shape {shape:?} of {d} overflows")))?;
        offsets.push(pos);
        dtypes.push(d);
        pos += n;
    }
    let ends: Vec<usize> = offsets.iter().skip(1).copied().chain([pos]).collect();
    let header = crate::header::serialize(
        entries.iter().enumerate().map(|(i, (name, _, shape))| crate::header::OutEntry {
            name,
            dtype: dtypes[i],
            shape,
            begin: offsets[i],
            end: ends[i],
        }),
        &metadata,
    );
    Ok((PyBytes::new(py, &header), offsets, pos))
}

/// AutoV1/V2/V3 of each file, files in parallel, each read once (GIL released).
#[pyfunction]
fn file_hashes(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Vec<BTreeMap<&'static str, String>>> {
    use rayon::prelude::*;
    let res: crate::Result<Vec<hashing::FileHashes>> =
        py.detach(|| paths.par_iter().map(|p| Checkpoint::open(p).map(|c| hashing::file_hashes(&c))).collect());
    Ok(res
        .map_err(to_py)?
        .into_iter()
        .map(|h| BTreeMap::from([("sha256", h.sha256), ("autov1", h.autov1), ("autov3", h.autov3)]))
        .collect())
}

/// Content hash of each named group of `(canonical name, key)` entries of one file.
#[pyfunction]
fn content_hashes(py: Python<'_>, path: PathBuf, groups: BTreeMap<String, Vec<(String, String)>>) -> PyResult<BTreeMap<String, String>> {
    py.detach(|| {
        let ck = Checkpoint::open(&path)?;
        groups
            .iter()
            .map(|(g, entries)| hashing::content_hash(&ck, entries).map(|h| (g.clone(), h)))
            .collect::<crate::Result<BTreeMap<_, _>>>()
    })
    .map_err(to_py)
}

/// The model-toolkit statistic `sum(sigmoid(fp16(x)) - 0.5)` of each key.
#[pyfunction]
fn sigmoid_sums(py: Python<'_>, path: PathBuf, keys: Vec<String>) -> PyResult<Vec<f64>> {
    py.detach(|| Checkpoint::open(&path).and_then(|ck| hashing::sigmoid_sums(&ck, &keys))).map_err(to_py)
}

/// Per file `(sum (x - r)^2, sum r^2)` over `keys`; `r` = file `reference`, or the mean of all.
#[pyfunction]
#[pyo3(signature = (paths, keys, reference=None))]
fn l2_distances(py: Python<'_>, paths: Vec<PathBuf>, keys: Vec<String>, reference: Option<usize>) -> PyResult<Vec<(f64, f64)>> {
    if reference.is_some_and(|r| r >= paths.len()) {
        return Err(PyValueError::new_err("reference index out of range"));
    }
    py.detach(|| engine::open_inputs(&paths).and_then(|cks| hashing::l2_distances(&cks, &keys, reference))).map_err(to_py)
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
    m.add_class::<PyWriter>()?;
    m.add_function(wrap_pyfunction!(execute, m)?)?;
    m.add_function(wrap_pyfunction!(resolve, m)?)?;
    m.add_function(wrap_pyfunction!(kernels, m)?)?;
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    m.add_function(wrap_pyfunction!(file_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(content_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(sigmoid_sums, m)?)?;
    m.add_function(wrap_pyfunction!(l2_distances, m)?)?;
    Ok(())
}
