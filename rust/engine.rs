//! The CPU executor: runs a plan over memory-mapped inputs with rayon, chunk by chunk, each
//! chunk's inputs added in plan order (so any thread count gives the same bits), and streams the
//! result through the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, InputFile};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::{self, Level};
use crate::plan::{Accumulate, Kind, Layout, Plan, Resolved, Resolver, SrcRef};
use crate::writer::{Mode, Writer};

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Worker threads; `None` = all cores.
    pub threads: Option<usize>,
    /// Elements per work item. 512K (a 2 MB accumulator) measured fastest on the 2-core box
    /// (0.90 s vs 0.99 s at 64K and 1.00 s at 1M for 4 x 2.1 GB, pread): fewer, larger
    /// positioned reads and writes win until the buffers leave the cache.
    pub chunk: usize,
    /// Kernel level; `None` = best detected.
    pub level: Option<Level>,
    /// How input bytes reach the kernels.
    pub io: Io,
    /// fsync before rename.
    pub durable: bool,
    /// What may be at the target already.
    pub mode: Mode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: None,
            chunk: 1 << 19,
            level: None,
            io: Io::Auto,
            durable: true,
            mode: Mode::Create,
        }
    }
}

/// How the engine reads input tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Straight from the memory map (page faults on first touch, munmap at the end).
    Mmap,
    /// `pread` each chunk into a per-thread buffer that stays in cache.
    Pread,
    /// `pread` for tensors read once, the map for multi-pass (robust) tensors, whose inputs are
    /// read two or three times: a copy per read costs more than a page fault per first touch
    /// (DGMLA at N=8: 0.4 s faster warm, 0.7 s cold of 11-12 s).
    Auto,
}

impl Io {
    /// How multi-pass tensors are read.
    fn multi_pass(self) -> Io {
        match self {
            Io::Auto => Io::Mmap,
            io => io,
        }
    }
}

/// Shared with whoever watches the run (the Python progress bar, Ctrl-C handling).
#[derive(Default)]
pub struct Progress {
    /// Input bytes processed so far.
    pub done: AtomicU64,
    /// Input bytes the plan reads in all (set once the plan is resolved).
    pub total: AtomicU64,
    /// Set to stop the run; it ends with `Error::Cancelled` and leaves no file.
    pub cancel: AtomicBool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The file written.
    pub output: PathBuf,
    /// Output tensors.
    pub tensors: usize,
    /// Input bytes read.
    pub bytes_read: u64,
    /// Bytes of the output file.
    pub bytes_written: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Worker threads used.
    pub threads: usize,
    /// Kernel level used.
    pub kernel: &'static str,
}

/// Opens every input, failing on the first bad one (its error names it).
pub fn open_inputs(paths: &[PathBuf]) -> Result<Vec<Checkpoint>> {
    if paths.is_empty() {
        return Err(Error::Plan("no input files given".into()));
    }
    paths.iter().map(Checkpoint::open).collect()
}

struct Item {
    tensor: usize,
    /// Element range, or byte range for raw bytes (copies, constants).
    start: usize,
    end: usize,
}

/// Reads elements `[s, e)` of source `r` (through the map or `pread` into `buf`) and hands the
/// bytes to `f`; returns the bytes read. For executors of other modules (robust merges).
pub(crate) fn read_source(
    layout: &Layout,
    r: &SrcRef,
    s: usize,
    e: usize,
    io: Io,
    buf: &mut Vec<u8>,
    f: impl FnOnce(&[u8]),
) -> Result<u64> {
    let (b, en) = range(r, s, e);
    let bytes = src_bytes(&layout.inputs, io, r.input, b, en, buf)?;
    f(bytes);
    Ok(bytes.len() as u64)
}

fn is_bytes(t: &Resolved) -> bool {
    matches!(t.kind, Kind::Copy(_) | Kind::Constant(_))
}

fn work_items(layout: &Layout, chunk: usize) -> Vec<Item> {
    let mut items = Vec::new();
    for (i, t) in layout.tensors.iter().enumerate() {
        if matches!(t.kind, Kind::Expr { .. }) {
            continue; // multi-pass: run whole by `robust::run_expr`
        }
        let (len, step) = if is_bytes(t) {
            (t.out_len, chunk * 4)
        } else {
            (t.numel, chunk)
        };
        let mut s = 0;
        while s < len {
            let e = (s + step).min(len);
            items.push(Item {
                tensor: i,
                start: s,
                end: e,
            });
            s = e;
        }
    }
    items
}

/// Per-thread scratch space, reused across items.
#[derive(Default)]
struct Scratch {
    acc: Vec<f32>,
    acc64: Vec<f64>,
    out: Vec<u8>,
    src: Vec<u8>,
}

/// Bytes `[begin, end)` of input `input`: a slice of the map, or a `pread` into `buf`.
fn src_bytes<'a>(
    inputs: &'a [Arc<InputFile>],
    io: Io,
    input: usize,
    begin: usize,
    end: usize,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    match io {
        Io::Mmap => Ok(&inputs[input].bytes()[begin..end]),
        Io::Pread | Io::Auto => {
            buf.resize(end - begin, 0);
            inputs[input].read_at(begin, buf)?;
            Ok(&buf[..])
        }
    }
}

fn run_item(layout: &Layout, item: &Item, level: Level, io: Io, scratch: &mut Scratch, writer: &Writer) -> Result<u64> {
    let t = &layout.tensors[item.tensor];
    let (s, e) = (item.start, item.end);
    let read = match &t.kind {
        Kind::Copy(r) => {
            let bytes = src_bytes(&layout.inputs, io, r.input, r.offset + s, r.offset + e, &mut scratch.src)?;
            writer.write_at((t.out_offset + s) as u64, bytes)?;
            return Ok(bytes.len() as u64);
        }
        Kind::Constant(data) => {
            writer.write_at((t.out_offset + s) as u64, &(**data).as_ref()[s..e])?;
            return Ok(0);
        }
        Kind::Cast { src, via } => {
            let c = Chunk {
                layout,
                t,
                s,
                e,
                level,
                io,
            };
            cast_chunk(&c, src, *via, scratch)?
        }
        Kind::Mean { sources, weights, via } => {
            let c = Chunk {
                layout,
                t,
                s,
                e,
                level,
                io,
            };
            mean_chunk(&c, sources, weights.as_deref(), *via, scratch)?
        }
        Kind::Expr { .. } => unreachable!("expressions are not split into items"),
    };
    writer.write_at((t.out_offset + s * t.dtype.size()) as u64, &scratch.out)?;
    Ok(read)
}

/// Input byte range of elements `[s, e)` of a source.
fn range(r: &SrcRef, s: usize, e: usize) -> (usize, usize) {
    (r.offset + s * r.dtype.size(), r.offset + e * r.dtype.size())
}

/// Elements `[s, e)` of output tensor `t`, and how to compute them.
struct Chunk<'a> {
    layout: &'a Layout,
    t: &'a Resolved,
    s: usize,
    e: usize,
    level: Level,
    io: Io,
}

/// Converts the chunk's elements of one source into `scratch.out`; returns the bytes read.
fn cast_chunk(c: &Chunk<'_>, r: &SrcRef, via: Accumulate, scratch: &mut Scratch) -> Result<u64> {
    let Chunk {
        layout,
        t,
        s,
        e,
        level,
        io,
    } = *c;
    let Scratch {
        acc,
        acc64,
        out,
        src: buf,
    } = scratch;
    let n = e - s;
    out.resize(n * t.dtype.size(), 0);
    let (b, en) = range(r, s, e);
    let src = src_bytes(&layout.inputs, io, r.input, b, en, buf)?;
    if via == Accumulate::F64 {
        acc64.resize(n, 0.0);
        kernels::load_f64_slice(acc64, src, r.dtype);
        kernels::finish_f64(acc64, None, out, t.dtype);
    } else {
        acc.resize(n, 0.0);
        kernels::load(acc, src, r.dtype);
        kernels::finish(level, acc, None, out, t.dtype);
    }
    Ok(src.len() as u64)
}

/// Averages the chunk's elements of every source, in plan order, into `scratch.out`; returns the
/// bytes read.
fn mean_chunk(c: &Chunk<'_>, sources: &[SrcRef], weights: Option<&[f64]>, via: Accumulate, scratch: &mut Scratch) -> Result<u64> {
    let Chunk {
        layout,
        t,
        s,
        e,
        level,
        io,
    } = *c;
    let Scratch {
        acc,
        acc64,
        out,
        src: buf,
    } = scratch;
    let n = e - s;
    out.resize(n * t.dtype.size(), 0);
    let mut read = 0u64;
    if via == Accumulate::F64 {
        acc64.clear();
        // -0.0 is addition's identity (+0.0 is not: +0 + -0 = +0), so a mean of one file, or of
        // files that all hold -0.0, keeps the sign of zero; every other sum is unchanged.
        acc64.resize(n, -0.0);
        for (k, r) in sources.iter().enumerate() {
            let (b, en) = range(r, s, e);
            let src = src_bytes(&layout.inputs, io, r.input, b, en, buf)?;
            read += src.len() as u64;
            kernels::accumulate_f64(acc64, src, r.dtype, weights.map(|w| w[k]));
        }
        let div = weights.is_none().then_some(sources.len() as f64);
        kernels::finish_f64(acc64, div, out, t.dtype);
        return Ok(read);
    }
    acc.clear();
    acc.resize(n, -0.0); // the identity of addition (see above)
    for (k, r) in sources.iter().enumerate() {
        let (b, en) = range(r, s, e);
        let src = src_bytes(&layout.inputs, io, r.input, b, en, buf)?;
        read += src.len() as u64;
        kernels::accumulate(level, acc, src, r.dtype, weights.map(|w| w[k] as f32));
    }
    let div = weights.is_none().then_some(sources.len() as f32);
    if t.dtype == Dtype::F64 {
        // An f32 sum written as f64: divide in f32 (the recipe), then widen exactly.
        let widened: Vec<f64> = acc.iter().map(|&a| div.map_or(a, |d| a / d) as f64).collect();
        kernels::finish_f64(&widened, None, out, t.dtype);
    } else {
        kernels::finish(level, acc, div, out, t.dtype);
    }
    Ok(read)
}

/// Most worker threads a run may ask for (thousands of threads only thrash).
pub const MAX_THREADS: usize = 1024;
/// Largest chunk, in elements.
pub const MAX_CHUNK: usize = 1 << 30;

/// Runs a resolved plan and writes `output`.
pub fn run_layout(layout: &Layout, output: &Path, opts: &Options, progress: &Progress) -> Result<Report> {
    let t0 = Instant::now();
    if opts.threads.is_some_and(|t| t > MAX_THREADS) {
        return Err(Error::Plan(format!("threads must be from 1 to {MAX_THREADS}")));
    }
    if opts.chunk > MAX_CHUNK {
        return Err(Error::Plan(format!("chunk must be at most {MAX_CHUNK} elements")));
    }
    progress.total.store(layout.bytes_read, Ordering::Relaxed);
    let writer = Writer::create(
        output,
        &layout.header,
        layout.data_len as u64,
        &layout.identities(),
        opts.mode,
    )?;
    let level = opts.level.unwrap_or_else(Level::detect);
    // More threads than a few per core only thrash: asked-for counts are capped there (the
    // report says how many ran; the CLI says so when it caps).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.unwrap_or_else(rayon::current_num_threads).clamp(1, 4 * cores);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Plan(format!("cannot start {threads} threads: {e}")))?;
    let items = work_items(layout, opts.chunk.max(64));
    let bytes_read = pool.install(|| {
        items
            .par_iter()
            .try_fold(
                || (Scratch::default(), 0u64),
                |(mut scratch, total), item| {
                    if progress.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    let r = run_item(layout, item, level, opts.io, &mut scratch, &writer)?;
                    progress.done.fetch_add(r, Ordering::Relaxed);
                    Ok((scratch, total + r))
                },
            )
            .map(|r| r.map(|(_, n)| n))
            .try_reduce(|| 0, |a, b| Ok(a + b))
    })?;
    let mut bytes_read = bytes_read;
    if layout.tensors.iter().any(|t| matches!(t.kind, Kind::Expr { .. })) {
        // Robust passes read every input block by block: ask for sequential read-ahead.
        layout.inputs.iter().for_each(|f| f.advise_sequential());
    }
    let exprs: Vec<&Resolved> = layout
        .tensors
        .iter()
        .filter(|t| matches!(t.kind, Kind::Expr { .. }))
        .collect();
    let ahead = ReadAhead::default();
    bytes_read += std::thread::scope(|scope| -> Result<u64> {
        if !exprs.is_empty() {
            scope.spawn(|| ahead.run(layout, &exprs));
        }
        // stops the read-ahead when this closure ends, however it ends (an error, a panic)
        let _stop = StopOnDrop(&ahead);
        let run = |t: &Resolved| -> Result<u64> {
            match &t.kind {
                Kind::Expr { sources, expr, via } => {
                    crate::robust::run_expr(layout, t, sources, expr, *via, opts.io.multi_pass(), &writer, progress)
                }
                _ => Ok(0),
            }
        };
        // A small tensor keeps few threads busy (a block or two per pass): runs of them go
        // side by side, each computed as alone (the same bits).
        let mut read = 0;
        let mut i = 0;
        while i < exprs.len() {
            ahead.at(i);
            let len = exprs[i..].iter().take_while(|t| t.numel < SMALL_EXPR).count().max(1);
            let group = &exprs[i..i + len];
            read += pool.install(|| group.par_iter().with_max_len(1).map(|t| run(t)).sum::<Result<u64>>())?;
            i += len;
        }
        Ok(read)
    })?;
    // A read through the map past the end of an input truncated meanwhile got zeros: refuse to
    // commit an output built from them.
    for f in &layout.inputs {
        f.check_intact()?;
    }
    let bytes_written = writer.file_len();
    writer.commit(opts.durable)?;
    Ok(Report {
        output: output.to_path_buf(),
        tensors: layout.tensors.len(),
        bytes_read,
        bytes_written,
        seconds: t0.elapsed().as_secs_f64(),
        threads,
        kernel: level.name(),
    })
}

/// Read-ahead for multi-pass tensors, which run one at a time: while tensor `i` computes, a
/// thread asks the kernel to read the inputs of the next ones (up to [`ReadAhead::window`] of
/// them) into the page cache, so a cold run costs about the larger of reading and computing
/// rather than their sum. The page cache is not the process's memory, and the window bounds how
/// much of it is claimed ahead.
#[derive(Default)]
struct ReadAhead {
    /// The index of the tensor running now (`usize::MAX`: stop).
    at: std::sync::Mutex<usize>,
    moved: std::sync::Condvar,
}

/// (input, first byte, end byte) of every source a multi-pass tensor reads.
fn source_ranges(t: &Resolved) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let sources = match &t.kind {
        Kind::Expr { sources, .. } => &sources[..],
        _ => &[],
    };
    sources.iter().map(|r| {
        let (b, e) = range(r, 0, t.numel);
        (r.input, b, e)
    })
}

/// Stops a [`ReadAhead`] when dropped.
struct StopOnDrop<'a>(&'a ReadAhead);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.at(usize::MAX);
    }
}

impl ReadAhead {
    /// The window: a sixth of the machine's memory, between 512 MB and 4 GB. A longer lead lets
    /// the disk work through the Gram and output passes, which read nothing new (cold DGMLA
    /// N=8 on this 24 GB box: 9.8-10.0 s with 4 GB, 10.1-11.5 s with 512 MB); the page cache
    /// still holds the tensor at hand with room to spare.
    fn window() -> u64 {
        // SAFETY: sysconf only reads system values.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ram = if pages > 0 && size > 0 {
            pages as u64 * size as u64
        } else {
            0
        };
        (ram / 6).clamp(512 << 20, 4 << 30)
    }
    /// Bytes of one input asked for at least at a time: the disk gets a few large sequential
    /// reads per file instead of one per tensor.
    const EXTENT: usize = 8 << 20;

    fn at(&self, i: usize) {
        *self.at.lock().unwrap_or_else(|e| e.into_inner()) = i;
        self.moved.notify_all();
    }

    fn run(&self, layout: &Layout, exprs: &[&Resolved]) {
        self.run_with(layout, exprs, Self::window())
    }

    /// [`ReadAhead::run`] with a window of `window` bytes.
    fn run_with(&self, layout: &Layout, exprs: &[&Resolved], window: u64) {
        let bytes = |t: &Resolved| -> u64 { source_ranges(t).map(|(_, b, e)| (e - b) as u64).sum() };
        // The next tensor to ask for; per input, the end of what was asked for (requests run on
        // to at least EXTENT bytes).
        let mut next = 0usize;
        let mut asked = vec![0usize; layout.inputs.len()];
        loop {
            let mut now = self.at.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if *now == usize::MAX {
                    return;
                }
                // (tensors already running or done are not asked for)
                next = next.max(*now);
                if next >= exprs.len() {
                    return;
                }
                let ahead: u64 = exprs[(*now + 1).min(next)..next].iter().map(|t| bytes(t)).sum();
                if next <= *now + 1 || ahead < window {
                    break;
                }
                now = self.moved.wait(now).unwrap_or_else(|e| e.into_inner());
            }
            drop(now);
            for (input, b, e) in source_ranges(exprs[next]) {
                if e > asked[input] {
                    let from = b.max(asked[input]);
                    let to = e.max(from + Self::EXTENT);
                    layout.inputs[input].will_need(from, to - from);
                    asked[input] = to;
                }
            }
            next += 1;
        }
    }
}

/// Opens `inputs` one at a time, checks the plan against each and lays out the output; each
/// parsed header is dropped once its sources are located, so memory holds one key table at a time.
pub fn prepare(plan: Plan, inputs: &[PathBuf]) -> Result<Layout> {
    let mut resolver = Resolver::new(plan, inputs.len())?;
    for (i, path) in inputs.iter().enumerate() {
        resolver.add(i, &Checkpoint::open(path)?)?;
    }
    resolver.finish()
}

/// Robust tensors of fewer elements than this run side by side (measured: tensors of 10-100 K
/// elements took 59 ns an element alone vs 36 for larger ones, DGMLA N=8).
const SMALL_EXPR: usize = 1 << 17;

/// Opens `inputs`, runs the plan and writes `output`. `seconds` covers the whole job.
pub fn execute(plan: Plan, inputs: &[PathBuf], output: &Path, opts: &Options, progress: &Progress) -> Result<Report> {
    let t0 = Instant::now();
    let layout = prepare(plan, inputs)?;
    let mut report = run_layout(&layout, output, opts, progress)?;
    drop(layout);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Op, OutputTensor, Source};
    use crate::testutil::{f16_bytes, write_file};
    use proptest::prelude::*;

    fn mean_plan(inputs: &[PathBuf], names: &[&str], weights: Option<Vec<f64>>) -> Plan {
        let n = inputs.len();
        Plan {
            outputs: names
                .iter()
                .map(|name| OutputTensor {
                    name: name.to_string(),
                    dtype: Some(Dtype::F16),
                    op: Op::Mean {
                        sources: (0..n)
                            .map(|i| Source {
                                input: i,
                                tensor: (*name).into(),
                            })
                            .collect(),
                        weights: weights.clone(),
                    },
                })
                .collect(),
            accumulate: Accumulate::F32,
            precision: Accumulate::F64,
            metadata: Default::default(),
        }
    }

    fn read_tensor(path: &Path, name: &str) -> Vec<u8> {
        let c = Checkpoint::open(path).unwrap();
        let t = c.get(name).unwrap().clone();
        c.data(&t).to_vec()
    }

    #[test]
    fn uniform_mean_matches_scalar_recipe() {
        let d = tempfile::tempdir().unwrap();
        let vals: Vec<Vec<f32>> = (0..3)
            .map(|k| (0..1000).map(|i| (i as f32 * 0.37 + k as f32).sin() * 7.0).collect())
            .collect();
        let paths: Vec<PathBuf> = (0..3)
            .map(|k| {
                let p = d.path().join(format!("m{k}.safetensors"));
                write_file(
                    &p,
                    &[
                        ("w", Dtype::F16, vec![10, 100], f16_bytes(&vals[k])),
                        ("ids", Dtype::I64, vec![2], vec![7; 16]),
                    ],
                );
                p
            })
            .collect();
        let out = d.path().join("out.safetensors");
        let mut plan = mean_plan(&paths, &["w"], None);
        plan.outputs.push(OutputTensor {
            name: "ids".into(),
            dtype: None,
            op: Op::Copy(Source {
                input: 0,
                tensor: "ids".into(),
            }),
        });
        let r = execute(plan, &paths, &out, &Options::default(), &Progress::default()).unwrap();
        assert_eq!(r.tensors, 2);
        assert_eq!(r.bytes_read, 3 * 2000 + 16);
        let got = read_tensor(&out, "w");
        let expect: Vec<u8> = (0..1000)
            .flat_map(|i| {
                let mut acc = 0f32;
                for v in &vals {
                    acc += half::f16::from_f32(v[i]).to_f32();
                }
                half::f16::from_f32(acc / 3.0).to_bits().to_le_bytes()
            })
            .collect();
        assert_eq!(got, expect);
        assert_eq!(read_tensor(&out, "ids"), vec![7; 16]);
    }

    #[test]
    fn error_missing_tensor_names_file() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0]))]);
        write_file(&b, &[("v", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0]))]);
        let out = d.path().join("o.safetensors");
        let e = execute(
            mean_plan(&[a.clone(), b.clone()], &["w"], None),
            &[a, b],
            &out,
            &Options::default(),
            &Progress::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("b.safetensors") && e.to_string().contains("'w'"),
            "{e}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn error_shape_mismatch_names_both_files() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        let b = d.path().join("b.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![2], f16_bytes(&[1.0, 2.0]))]);
        write_file(&b, &[("w", Dtype::F16, vec![1, 2], f16_bytes(&[1.0, 2.0]))]);
        let out = d.path().join("o.safetensors");
        let e = execute(
            mean_plan(&[a.clone(), b.clone()], &["w"], None),
            &[a, b],
            &out,
            &Options::default(),
            &Progress::default(),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("a.safetensors") && s.contains("b.safetensors") && s.contains("'w'"),
            "{s}"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn error_int_tensor_cannot_be_averaged() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        write_file(&a, &[("ids", Dtype::I64, vec![1], vec![0; 8])]);
        let out = d.path().join("o.safetensors");
        let e = execute(
            mean_plan(std::slice::from_ref(&a), &["ids"], None),
            &[a],
            &out,
            &Options::default(),
            &Progress::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot be averaged"), "{e}");
    }

    #[test]
    fn cancel_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![4096], f16_bytes(&[1.0; 4096]))]);
        let out = d.path().join("o.safetensors");
        let p = Progress::default();
        p.cancel.store(true, Ordering::Relaxed);
        let e = execute(
            mean_plan(std::slice::from_ref(&a), &["w"], None),
            &[a],
            &out,
            &Options::default(),
            &p,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_ahead_ends_when_done_and_when_stopped() {
        // Multi-pass tensors (linear expressions), larger than the window together: the
        // read-ahead must finish once the runs move on, and stop at once when told.
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        let names: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
        let tensors: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), Dtype::F16, vec![1024], f16_bytes(&[0.5; 1024])))
            .collect();
        write_file(&a, &tensors);
        let plan = Plan {
            outputs: names
                .iter()
                .map(|n| OutputTensor {
                    name: n.clone(),
                    dtype: Some(Dtype::F16),
                    op: Op::Expr {
                        sources: vec![Source {
                            input: 0,
                            tensor: n.as_str().into(),
                        }],
                        expr: Arc::new(crate::robust::Expr {
                            linear: vec![(0, 2.0)],
                            ..Default::default()
                        }),
                    },
                })
                .collect(),
            accumulate: Accumulate::F32,
            precision: Accumulate::F64,
            metadata: Default::default(),
        };
        let layout = prepare(plan, &[a]).unwrap();
        let exprs: Vec<&Resolved> = layout.tensors.iter().collect();
        let finishes = |drive: &dyn Fn(&ReadAhead)| {
            let ahead = ReadAhead::default();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                s.spawn(|| {
                    ahead.run_with(&layout, &exprs, 2048);
                    tx.send(()).unwrap();
                });
                drive(&ahead);
                let ok = rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok();
                ahead.at(usize::MAX);
                ok
            })
        };
        // the window holds one 2 KB tensor: the thread waits until the runs move on
        assert!(finishes(&|a: &ReadAhead| (0..6).for_each(|i| a.at(i))));
        assert!(finishes(&|a: &ReadAhead| a.at(usize::MAX)));
        // and the whole run agrees with the expression
        let out = d.path().join("o.safetensors");
        run_layout(&layout, &out, &Options::default(), &Progress::default()).unwrap();
        assert_eq!(read_tensor(&out, "w5"), f16_bytes(&[1.0; 1024]));
    }

    #[test]
    fn constant_and_cast() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.safetensors");
        write_file(&a, &[("w", Dtype::F16, vec![3], f16_bytes(&[-0.0, 1.5, -2.25]))]);
        let data: crate::plan::Bytes = Arc::new(vec![1u8, 0, 0, 0, 0, 0, 0, 0]);
        let plan = Plan {
            outputs: vec![
                OutputTensor {
                    name: "c".into(),
                    dtype: None,
                    op: Op::Constant {
                        dtype: Dtype::I64,
                        shape: vec![1],
                        data,
                    },
                },
                OutputTensor {
                    name: "w".into(),
                    dtype: Some(Dtype::F32),
                    op: Op::Cast(Source {
                        input: 0,
                        tensor: "w".into(),
                    }),
                },
            ],
            accumulate: Accumulate::F32,
            precision: Accumulate::F64,
            metadata: Default::default(),
        };
        let out = d.path().join("o.safetensors");
        let r = execute(plan, &[a], &out, &Options::default(), &Progress::default()).unwrap();
        assert_eq!(r.bytes_read, 6);
        assert_eq!(read_tensor(&out, "c"), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        let w: Vec<u8> = [-0.0f32, 1.5, -2.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(read_tensor(&out, "w"), w, "a cast keeps the sign of zero");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Same bytes for 1, 2 and 7 threads, either I/O path and any chunk size, weighted or not.
        #[test]
        fn thread_count_never_changes_bits(n in 1usize..6, len in 0usize..3000, chunk in 64usize..700, weighted in any::<bool>(), seed in any::<u64>()) {
            let d = tempfile::tempdir().unwrap();
            let mut x = seed | 1;
            let mut rnd = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x % 20000) as f32 / 997.0 - 10.0 };
            let paths: Vec<PathBuf> = (0..n).map(|k| {
                let p = d.path().join(format!("m{k}.safetensors"));
                let v: Vec<f32> = (0..len).map(|_| rnd()).collect();
                let b: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                write_file(&p, &[("w", Dtype::F32, vec![len], b)]);
                p
            }).collect();
            let weights = weighted.then(|| crate::plan::normalize_weights(&(1..=n).map(|i| i as f64).collect::<Vec<_>>()).unwrap());
            let plan = mean_plan(&paths, &["w"], weights);
            let mut outs = vec![];
            for (i, (threads, io)) in [(1usize, Io::Pread), (2, Io::Mmap), (7, Io::Auto)].into_iter().enumerate() {
                let out = d.path().join(format!("o{i}.safetensors"));
                let opts = Options { threads: Some(threads), chunk, io, durable: false, ..Options::default() };
                execute(plan.clone(), &paths, &out, &opts, &Progress::default()).unwrap();
                outs.push(read_tensor(&out, "w"));
            }
            prop_assert_eq!(&outs[0], &outs[1]);
            prop_assert_eq!(&outs[0], &outs[2]);
        }
    }
}
