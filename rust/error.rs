//! The crate's one error type. Every message names the file and, where there is one, the tensor,
//! because a merge author with 40 inputs needs to know which download is broken.

use std::path::{Path, PathBuf};

/// What went wrong, with enough context to act on it. Fields: `path` is the file concerned,
/// `tensor` the tensor, `reason` what is wrong.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file does not exist.
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    /// The path is a directory, not a checkpoint.
    #[error("{path}: is a directory, not a .safetensors file")]
    IsDirectory { path: PathBuf },
    /// An OS error while reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A pickle checkpoint (`.ckpt`/`.pt`) was given where safetensors is required.
    #[error(
        "{path}: this is a pickle checkpoint (.ckpt/.pt), not safetensors; convert it first (its pickle is read, \
         never run): `astolfomix convert {path} OUT.safetensors`"
    )]
    Pickle { path: PathBuf },
    /// The safetensors container is malformed.
    #[error("{path}: invalid safetensors file: {reason}")]
    InvalidFile { path: PathBuf, reason: String },
    /// One tensor's header entry is malformed.
    #[error("{path}: tensor '{tensor}': {reason}")]
    InvalidTensor { path: PathBuf, tensor: String, reason: String },
    /// Inputs disagree about a tensor (shape, kind of dtype) or a key is missing in strict mode.
    #[error("tensor '{tensor}': {reason}")]
    Mismatch { tensor: String, reason: String },
    /// The plan itself is not executable (bad weights, no inputs, unknown source...).
    #[error("invalid plan: {0}")]
    Plan(String),
    /// The output cannot be written where asked.
    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },
    /// Several problems found while resolving a plan, reported together.
    #[error("{}", problems_text(problems, more))]
    Problems {
        problems: Vec<Error>,
        /// Inputs with more problems than listed: (file, how many more).
        more: Vec<(PathBuf, usize)>,
    },
    /// An input became shorter while it was read (another program truncated or rewrote it).
    #[error("{path} changed while it was read (now {now} bytes, expected {expected})")]
    Changed { path: PathBuf, now: u64, expected: u64 },
    /// The run was interrupted (Ctrl-C); nothing was left behind.
    #[error("cancelled; no output was written")]
    Cancelled,
}

fn problems_text(problems: &[Error], more: &[(PathBuf, usize)]) -> String {
    let total = problems.len() + more.iter().map(|m| m.1).sum::<usize>();
    let mut s = format!("{total} problems, nothing written:");
    for p in problems {
        s.push_str(&format!("\n  {p}"));
    }
    for (path, n) in more {
        s.push_str(&format!("\n  ... and {n} more problems in {}", path.display()));
    }
    s
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Error::InvalidFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(path: &Path, tensor: &str, reason: impl Into<String>) -> Self {
        Error::InvalidTensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn output(path: &Path, reason: impl Into<String>) -> Self {
        Error::Output {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// Every name [`Error::kind`] can return (a test checks each has a Python class).
    pub const KINDS: [&'static str; 8] = [
        "InputNotFoundError",
        "InvalidFileError",
        "DiskFullError",
        "AstolfomixIOError",
        "MismatchError",
        "PlanError",
        "OutputError",
        "Cancelled",
    ];

    /// The name of the Python exception class this error maps to (see `errors.py`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "InputNotFoundError",
            Error::IsDirectory { .. } | Error::Pickle { .. } => "InvalidFileError",
            Error::InvalidFile { .. } | Error::InvalidTensor { .. } => "InvalidFileError",
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => "DiskFullError",
            Error::Io { .. } | Error::Changed { .. } => "AstolfomixIOError",
            Error::Mismatch { .. } | Error::Problems { .. } => "MismatchError",
            Error::Plan(_) => "PlanError",
            Error::Output { .. } => "OutputError",
            Error::Cancelled => "Cancelled",
        }
    }
}
