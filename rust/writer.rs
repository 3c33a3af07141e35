//! The one streaming, atomic writer. The header is known from the plan, so it is written first
//! and workers write their chunks straight to their place with positioned writes (`pwrite`):
//! memory stays bounded by threads x chunk size. Everything goes to a temporary file beside the
//! target, which is fsynced (when durable) and renamed over it; dropped uncommitted, it is removed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// What may already be at the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: an existing file is an error.
    Create,
    /// A file that is not one of the inputs is replaced.
    Overwrite,
    /// The target is input #i and is replaced by the result (an in-place edit); it may not be
    /// any other input.
    InPlace(usize),
}

/// An output file being written.
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
    file: File,
    data_start: u64,
    data_len: u64,
    written: AtomicU64,
    committed: bool,
    mode: Mode,
}

/// Output errors name the target the user asked for, not the hidden temp file; a full disk or
/// quota keeps ENOSPC (the Python side's DiskFullError), and a file larger than the file system
/// allows says so rather than "disk full".
fn write_error(target: &Path, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::io(target, std::io::Error::from_raw_os_error(libc::ENOSPC)),
        Some(libc::EFBIG) => Error::output(
            target,
            "is larger than this file system allows for one file (EFBIG); write it to another file system",
        ),
        _ => Error::io(target, e),
    }
}

/// Paths this process has committed, in order: what a command reports as written when it is
/// interrupted after the rename (the interrupt arrives once the engine returns).
static COMMITTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Every output this process has committed so far.
pub fn committed() -> Vec<PathBuf> {
    COMMITTED.lock().map(|v| v.clone()).unwrap_or_default()
}

/// Marks our temp files: `.NAME.astolfomix-PID-NONCE.tmp` (NAME cut to fit the 255-byte limit).
const TMP_TAG: &str = ".astolfomix-";

/// The temp file name for `name`, owned by this process (the Python side's temp files and
/// folders take theirs from here too, through `_core.temp_path`, so `clean_stale` knows them).
pub fn tmp_name(name: &str) -> String {
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}{TMP_TAG}{}-{:x}.tmp", &name[..cut], std::process::id(), nonce())
}

/// The owner pid of one of our temp files, from its name.
fn tmp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_suffix(".tmp")?;
    let (_, tail) = rest.rsplit_once(TMP_TAG)?;
    let (pid, nonce) = tail.split_once('-')?;
    if !file_name.starts_with('.') || !nonce.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes the temp files in `dir` left by runs of this tool whose process is gone (killed with
/// SIGKILL, or a crash): returns `(path, bytes)` of each removed. Files of live runs stay.
pub fn clean_stale(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let Ok(e) = e else { continue };
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(tmp_owner) else {
            continue;
        };
        if pid == std::process::id() || alive(pid) {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        // A temp folder is a transformers export in progress (see `components.py`).
        let gone = if m.is_file() {
            std::fs::remove_file(e.path()).is_ok()
        } else {
            m.is_dir() && std::fs::remove_dir_all(e.path()).is_ok()
        };
        if gone {
            removed.push((e.path(), m.len()));
        }
    }
    Ok(removed)
}

impl Writer {
    /// Checks the target, creates the temporary file, reserves its space and writes the header.
    /// `inputs` are the (device, inode) pairs of the open inputs: the target may not be one,
    /// except the one an in-place `mode` names.
    pub fn create(target: &Path, header: &[u8], data_len: u64, inputs: &[(u64, u64)], mode: Mode) -> Result<Writer> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::output(target, format!("folder {} does not exist", parent.display())));
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::output(target, "output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        let existing = std::fs::metadata(target).ok();
        if let Mode::InPlace(i) = mode {
            let want = inputs
                .get(i)
                .ok_or_else(|| Error::Plan(format!("in-place output names input #{i} of {}", inputs.len())))?;
            if existing.as_ref().map(|m| (m.dev(), m.ino())) != Some(*want) {
                return Err(Error::output(
                    target,
                    format!("is not input #{i}; an in-place edit replaces its own input only"),
                ));
            }
        }
        match existing {
            Some(m) if m.is_dir() => return Err(Error::output(target, "is a directory")),
            Some(m) if !m.is_file() => {
                return Err(Error::output(
                    target,
                    "is not a regular file (a device, FIFO or socket); refusing to replace it",
                ))
            }
            Some(_) if matches!(mode, Mode::InPlace(_)) => {}
            Some(m) if inputs.contains(&(m.dev(), m.ino())) => {
                return Err(Error::output(target, "is one of the inputs; refusing to write over an input"))
            }
            Some(_) if mode == Mode::Create => {
                return Err(Error::output(target, "already exists (pass overwrite=True / --overwrite)"))
            }
            _ => {}
        }
        // Leftovers of killed runs in this folder go first (they can be many GB).
        let _ = clean_stale(&parent);
        let tmp = parent.join(tmp_name(&name));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| write_error(target, e))?;
        let mut w = Writer {
            target: target.to_path_buf(),
            tmp,
            file,
            data_start: header.len() as u64,
            data_len,
            written: AtomicU64::new(0),
            committed: false,
            mode,
        };
        w.reserve()?;
        w.file.write_all_at(header, 0).map_err(|e| write_error(&w.target, e))?;
        Ok(w)
    }

    /// Reserves the whole file up front, so a full disk fails now rather than at the last chunk.
    fn reserve(&mut self) -> Result<()> {
        let len = self.data_start + self.data_len;
        if len == 0 {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, len as libc::off_t) };
        match rc {
            0 => Ok(()),
            libc::EOPNOTSUPP | libc::EINVAL => self.file.set_len(len).map_err(|e| write_error(&self.target, e)),
            e => Err(write_error(&self.target, std::io::Error::from_raw_os_error(e))),
        }
    }

    /// Writes `bytes` at `offset` within the data section. Safe to call from many threads.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() as u64 > self.data_len {
            return Err(Error::Plan(format!(
                "write of {} bytes at {offset} runs past the {}-byte data section",
                bytes.len(),
                self.data_len
            )));
        }
        self.file
            .write_all_at(bytes, self.data_start + offset)
            .map_err(|e| write_error(&self.target, e))?;
        self.written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of tensor data written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Total bytes of the finished file.
    pub fn file_len(&self) -> u64 {
        self.data_start + self.data_len
    }

    /// Makes the file visible under its name: fsync (if durable), rename, fsync the folder.
    pub fn commit(mut self, durable: bool) -> Result<()> {
        if self.written() != self.data_len {
            return Err(Error::Plan(format!(
                "{}: only {} of {} data bytes were written",
                self.target.display(),
                self.written(),
                self.data_len
            )));
        }
        if durable {
            self.file.sync_all().map_err(|e| write_error(&self.target, e))?;
        }
        if self.mode == Mode::Create {
            self.rename_noreplace()?;
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        self.committed = true;
        if let Ok(mut v) = COMMITTED.lock() {
            v.push(self.target.clone());
        }
        if durable {
            if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        Ok(())
    }
}

impl Writer {
    /// Renames the temp file to the target only if nothing is there: a file created at the
    /// target while this ran (another merge, the user) is never replaced without `overwrite`.
    fn rename_noreplace(&self) -> Result<()> {
        let taken = || {
            Error::output(
                &self.target,
                "was created by something else while this ran; not replaced (pass overwrite=True / --overwrite)",
            )
        };
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Error::output(p, "path holds a NUL byte"))
        };
        let (from, to) = (c(&self.tmp)?, c(&self.target)?);
        // SAFETY: both are valid NUL-terminated paths for the duration of the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => Err(taken()),
            // A file system without RENAME_NOREPLACE: a hard link fails the same way if the
            // target exists; then the temp name goes.
            Some(libc::EINVAL) | Some(libc::ENOSYS) => match std::fs::hard_link(&self.tmp, &self.target) {
                Ok(()) => std::fs::remove_file(&self.tmp).map_err(|e| Error::io(&self.tmp, e)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(taken()),
                Err(e) => Err(Error::io(&self.target, e)),
            },
            _ => Err(Error::io(&self.target, e)),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        crate::header::serialize(std::iter::empty(), &Default::default())
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn temp_names_carry_the_owner_and_fit_long_names() {
        let name = "n".repeat(250) + ".safetensors";
        let t = tmp_name(&name[..255]);
        assert!(t.len() <= 255, "{}", t.len());
        assert_eq!(tmp_owner(&t), Some(std::process::id()));
        assert_eq!(tmp_owner(".a.b.123.abc.tmp"), None); // not ours
        let d = tempfile::tempdir().unwrap();
        let long = d.path().join(&name[..255]);
        let w = Writer::create(&long, &header(), 0, &[], Mode::Create).unwrap();
        w.commit(false).unwrap();
        assert!(long.exists());
    }

    #[test]
    fn stale_temp_files_of_dead_runs_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let gone = d.path().join(format!(".m.safetensors{TMP_TAG}{dead}-ab12.tmp"));
        let live = d.path().join(format!(".m.safetensors{TMP_TAG}1-ab12.tmp")); // init never exits
        let mine = d.path().join(tmp_name("x.safetensors"));
        let other = d.path().join(format!(".m.safetensors.{dead}.ab12.tmp")); // another tool's name
        for p in [&gone, &live, &mine, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let removed = clean_stale(d.path()).unwrap();
        assert_eq!(removed, vec![(gone.clone(), 1)]);
        assert!(!gone.exists() && live.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn error_missing_folder() {
        let d = tempfile::tempdir().unwrap();
        let e = Writer::create(&d.path().join("nope/out.safetensors"), &header(), 0, &[], Mode::Create)
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn error_exists_without_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        std::fs::write(&p, b"keep").unwrap();
        let e = Writer::create(&p, &header(), 0, &[], Mode::Create).err().unwrap();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn error_target_is_input() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        std::fs::write(&p, b"keep").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        let e = Writer::create(&p, &header(), 0, &[(m.dev(), m.ino())], Mode::Overwrite)
            .err()
            .unwrap();
        assert!(e.to_string().contains("one of the inputs"), "{e}");
    }

    #[test]
    fn in_place_replaces_only_its_own_input() {
        let d = tempfile::tempdir().unwrap();
        let (p, q) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
        std::fs::write(&p, b"old").unwrap();
        std::fs::write(&q, b"other").unwrap();
        let id = |x: &Path| {
            let m = std::fs::metadata(x).unwrap();
            (m.dev(), m.ino())
        };
        let ids = [id(&p), id(&q)];
        let e = Writer::create(&q, &header(), 0, &ids, Mode::InPlace(0)).err().unwrap();
        assert!(e.to_string().contains("not input #0"), "{e}");
        let h = header();
        let w = Writer::create(&p, &h, 2, &ids, Mode::InPlace(0)).unwrap();
        w.write_at(0, &[5, 6]).unwrap();
        w.commit(false).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[h.len()..], &[5, 6]);
        assert_eq!(std::fs::read(&q).unwrap(), b"other");
    }

    #[test]
    fn error_target_is_directory() {
        let d = tempfile::tempdir().unwrap();
        let e = Writer::create(d.path(), &header(), 0, &[], Mode::Overwrite).err().unwrap();
        assert!(
            e.to_string().contains("directory") || e.to_string().contains("file name"),
            "{e}"
        );
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        let w = Writer::create(&p, &header(), 16, &[], Mode::Create).unwrap();
        w.write_at(0, &[1; 8]).unwrap();
        drop(w);
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn incomplete_commit_is_refused_and_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        let w = Writer::create(&p, &header(), 16, &[], Mode::Create).unwrap();
        w.write_at(0, &[1; 8]).unwrap();
        assert!(w.write_at(12, &[1; 8]).is_err());
        assert!(w.commit(false).is_err());
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn error_target_created_while_running_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        let w = Writer::create(&p, &header(), 4, &[], Mode::Create).unwrap();
        w.write_at(0, &[9; 4]).unwrap();
        std::fs::write(&p, b"theirs").unwrap();
        let e = w.commit(false).err().unwrap();
        assert!(e.to_string().contains("created by something else"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"theirs");
        assert_eq!(leftovers(d.path()), vec!["o.safetensors"]);
    }

    #[test]
    fn error_device_or_fifo_at_the_target() {
        let e = Writer::create(Path::new("/dev/null"), &header(), 0, &[], Mode::Overwrite)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn commit_renames() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.safetensors");
        let h = header();
        let w = Writer::create(&p, &h, 4, &[], Mode::Create).unwrap();
        w.write_at(0, &[9; 4]).unwrap();
        w.commit(true).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[h.len()..], &[9; 4]);
        assert_eq!(leftovers(d.path()), vec!["o.safetensors"]);
    }
}
