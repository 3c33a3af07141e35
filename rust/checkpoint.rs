//! A safetensors file opened read-only through a memory map, its header validated.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::header::{self, Header, TensorInfo};

/// Files opened (and headers parsed) by this process: tests check that a command opens each of
/// its inputs once.
static OPENS: AtomicU64 = AtomicU64::new(0);

/// How many checkpoints this process has opened so far.
pub fn open_count() -> u64 {
    OPENS.load(Ordering::Relaxed)
}

/// The opened file itself: what a resolved plan keeps once the parsed header is no longer needed.
/// Shared (`Arc`) between the checkpoint, resolved plans and executors, so nothing opens it twice.
pub struct InputFile {
    /// The path it was opened under.
    pub path: PathBuf,
    /// Its length when opened.
    pub file_len: u64,
    /// (device, inode): how the writer recognises an input under another name.
    pub identity: (u64, u64),
    /// Byte offset of the data section (8 + header length).
    pub data_start: usize,
    // Declared before the map: fields drop in order, and the guard must go before the map does.
    guard: Guard,
    mmap: Mmap,
    file: File,
}

impl InputFile {
    /// The whole file, mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Tells the kernel this file will be read from start to end (larger read-ahead), so a pass
    /// over many inputs streams from disk rather than seeks. Advice only: errors are ignored.
    pub fn advise_sequential(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor this value owns; no memory is passed.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }

    /// Asks the kernel to start reading bytes `[offset, offset + len)` into the page cache now
    /// (asynchronous read-ahead). Advice only: errors are ignored.
    pub fn will_need(&self, offset: usize, len: usize) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor this value owns; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// Reads `buf.len()` bytes at `offset` with `pread` (a copy into `buf` instead of page faults
    /// on the map). A file that became shorter is reported as changed.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset as u64).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.changed(),
            _ => Error::io(&self.path, e),
        })
    }

    /// Whether everything read through the map so far came from the file: a read past the end of
    /// a file truncated after it was opened gets zeros (see `guard`) and fails this check. Call
    /// it after reading through [`InputFile::bytes`], before the bytes are trusted.
    pub fn check_intact(&self) -> Result<()> {
        if self.guard.tripped() {
            return Err(self.changed());
        }
        Ok(())
    }

    fn changed(&self) -> Error {
        changed(&self.path, &self.file, self.file_len)
    }
}

/// `path` (open as `file`) is no longer `expected` bytes long: says how long it is now.
fn changed(path: &Path, file: &File, expected: u64) -> Error {
    Error::Changed {
        path: path.to_path_buf(),
        now: file.metadata().map(|m| m.len()).unwrap_or(0),
        expected,
    }
}

/// An open checkpoint: the file and its validated header. The map stays valid as long as nobody
/// truncates the file underneath us; this crate never writes to a file it has open as an input
/// (see `writer`).
pub struct Checkpoint {
    /// The file, shared with resolved plans.
    pub file: Arc<InputFile>,
    /// The parsed, validated header.
    pub header: Header,
    /// Tensor indices sorted by name (binary search; no second copy of the names).
    index: Vec<u32>,
}

impl Checkpoint {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
            },
            _ => Error::io(path, e),
        })?;
        if meta.is_dir() {
            return Err(Error::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        let not_regular = || Error::invalid(path, "not a regular file (a FIFO, device or socket); refused");
        if !meta.is_file() {
            return Err(not_regular());
        }
        // O_NONBLOCK: a FIFO put here after the check above must not block the open; the opened
        // file is checked again, and its own length is used.
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let file_len = meta.len();
        if file_len == 0 {
            return Err(Error::invalid(
                path,
                "file is empty (0 bytes), shorter than the 8-byte header length",
            ));
        }
        // SAFETY: the map is read-only and private to this process. Another process may truncate
        // the file while it is mapped: the guard turns the SIGBUS of a read past the new end into
        // zeros and a mark that readers check (`check_intact`). Rewriting it in place would change
        // what we read; the writer refuses to write over any open input.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let guard = Guard::new(mmap.as_ptr(), mmap.len())?;
        // A pickle's first bytes can also read as a plausible header length (0x80 0x02 is 640),
        // so the magic is only consulted once the file has failed to parse as safetensors.
        let parsed = header::header_len(path, &mmap, file_len).and_then(|n| {
            let data_len = file_len as usize - 8 - n;
            header::parse(path, &mmap[8..8 + n], data_len)
        });
        let header = match parsed {
            Ok(h) => h,
            Err(_) if header::looks_like_pickle(&mmap[..mmap.len().min(8)]) => {
                return Err(Error::Pickle {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(e),
        };
        if guard.tripped() {
            return Err(changed(path, &file, file_len));
        }
        let mut index: Vec<u32> = (0..header.tensors.len() as u32).collect();
        index.sort_by(|&a, &b| header.tensors[a as usize].name.cmp(&header.tensors[b as usize].name));
        OPENS.fetch_add(1, Ordering::Relaxed);
        let file = InputFile {
            path: path.to_path_buf(),
            file_len,
            identity: (meta.dev(), meta.ino()),
            data_start: header.data_start,
            guard,
            mmap,
            file,
        };
        Ok(Checkpoint {
            file: Arc::new(file),
            header,
            index,
        })
    }

    /// The path it was opened under.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The header entry for `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        let t = &self.header.tensors;
        self.index
            .binary_search_by(|&i| t[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|pos| &t[self.index[pos] as usize])
    }

    /// The stored bytes of one tensor (validated to lie inside the file at open).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let s = self.header.data_start;
        &self.file.bytes()[s + t.begin..s + t.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_pickle() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.ckpt");
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        let e = Checkpoint::open(&p).err().unwrap();
        assert!(matches!(e, Error::Pickle { .. }), "{e}");
        assert!(e.to_string().contains("astolfomix convert"));
    }

    #[test]
    fn header_of_640_bytes_is_not_a_pickle() {
        // Its length prefix begins 0x80 0x02, like a protocol-2 pickle.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let entry = r#"{"dtype":"F16","shape":[1],"data_offsets":[0,2]}"#;
        let name = "k".repeat(640 - entry.len() - 5);
        let json = format!("{{\"{name}\":{entry}}}");
        assert_eq!(json.len(), 640);
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(&[0, 0]);
        std::fs::write(&p, bytes).unwrap();
        let c = Checkpoint::open(&p).unwrap();
        assert!(c.get(&name).is_some());
    }

    #[test]
    fn error_not_a_regular_file() {
        // A FIFO would block a plain open forever; a character device reads endless zeros.
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("x.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for p in [fifo.as_path(), Path::new("/dev/zero")] {
            let e = Checkpoint::open(p).err().unwrap();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn error_empty_missing_and_directory() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("empty.safetensors");
        std::fs::write(&p, b"").unwrap();
        assert!(Checkpoint::open(&p).err().unwrap().to_string().contains("empty"));
        assert!(matches!(
            Checkpoint::open(d.path().join("nope")).err().unwrap(),
            Error::NotFound { .. }
        ));
        assert!(matches!(Checkpoint::open(d.path()).err().unwrap(), Error::IsDirectory { .. }));
    }
}
