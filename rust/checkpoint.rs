//! A safetensors file opened read-only through a memory map, its header validated.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::header::{self, Header, TensorInfo};

/// An open checkpoint. The map stays valid as long as nobody truncates the file underneath
/// us; this crate never writes to a file it has open as an input (see `writer`).
pub struct Checkpoint {
    pub path: PathBuf,
    pub header: Header,
    pub file_len: u64,
    /// (device, inode): how the writer recognises an input under another name.
    pub identity: (u64, u64),
    /// Tensor indices sorted by name (binary search; no second copy of the names).
    index: Vec<u32>,
    mmap: Mmap,
}

impl Checkpoint {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound { path: path.to_path_buf() },
            _ => Error::io(path, e),
        })?;
        if meta.is_dir() {
            return Err(Error::IsDirectory { path: path.to_path_buf() });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = meta.len();
        if file_len == 0 {
            return Err(Error::invalid(path, "file is empty (0 bytes), shorter than the 8-byte header length"));
        }
        // SAFETY: the map is read-only and private to this process. Undefined behaviour would
        // need another process to truncate or rewrite the file while it is mapped; the writer
        // refuses to write over any open input, and we document that inputs must not change.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if header::looks_like_pickle(&mmap[..mmap.len().min(8)]) {
            return Err(Error::Pickle { path: path.to_path_buf() });
        }
        let n = header::header_len(path, &mmap, file_len)?;
        let data_len = file_len as usize - 8 - n;
        let header = header::parse(path, &mmap[8..8 + n], data_len)?;
        let mut index: Vec<u32> = (0..header.tensors.len() as u32).collect();
        index.sort_by(|&a, &b| header.tensors[a as usize].name.cmp(&header.tensors[b as usize].name));
        Ok(Checkpoint {
            path: path.to_path_buf(),
            header,
            file_len,
            identity: (meta.dev(), meta.ino()),
            index,
            mmap,
        })
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
        &self.mmap[s + t.begin..s + t.end]
    }

    /// The whole file, mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Frees the parsed header once a plan is resolved: the run needs only the map.
    pub fn release_header(&mut self) {
        self.header.tensors = Vec::new();
        self.index = Vec::new();
    }

    /// Tells the kernel we will read the whole data section soon (readahead on cold files).
    pub fn will_need(&self) {
        let _ = self.mmap.advise(memmap2::Advice::WillNeed);
    }
}
