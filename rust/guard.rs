//! Keeps a truncated input from killing the process. Reading a page of a memory map beyond the
//! end of a file that shrank after it was mapped raises SIGBUS, whose default action ends the
//! process with no message and leaves the temp file behind. Every map this crate makes is
//! registered here; a SIGBUS inside one of them replaces the rest of that map with zero pages
//! (so the read completes, with zeros) and marks it tripped. Readers check the mark after they
//! read ([`crate::checkpoint::InputFile::check_intact`]) and report the file as changed. A SIGBUS
//! anywhere else goes to the handler that was there before (Python's faulthandler, or the
//! default action).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Maps that can be open at once (inputs of one run, plus files being hashed or inspected).
const SLOTS: usize = 4096;

struct Slot {
    used: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    tripped: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the static array
const EMPTY: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    tripped: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The handler that was installed before ours (written once, before ours can run).
static mut PREVIOUS: Option<libc::sigaction> = None;

/// One registered map; unregisters on drop (drop it before the map is unmapped).
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `[ptr, ptr + len)`. Fails only when [`SLOTS`] maps are already open.
    pub fn new(ptr: *const u8, len: usize) -> Result<Guard> {
        INSTALL.call_once(install);
        for (i, s) in TABLE.iter().enumerate() {
            if s.used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                s.tripped.store(false, Ordering::Relaxed);
                s.end.store(ptr as usize + len, Ordering::Release);
                s.start.store(ptr as usize, Ordering::Release);
                return Ok(Guard { slot: i });
            }
        }
        Err(Error::Plan(format!("more than {SLOTS} files open at once")))
    }

    /// Whether a read ran past the end of the file (the map now holds zeros there).
    pub fn tripped(&self) -> bool {
        TABLE[self.slot].tripped.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.start.store(0, Ordering::Release);
        s.end.store(0, Ordering::Release);
        s.used.store(false, Ordering::Release);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn install() {
    // SAFETY: sigaction with a zeroed struct filled as the man page describes; PREVIOUS is
    // written here, inside `Once`, before our handler is installed and can read it.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        let mut new: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        new.sa_sigaction = handler as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut new.sa_mask);
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return;
        }
        PREVIOUS = Some(old);
        libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut());
    }
}

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `sigaction` only).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        let end = s.end.load(Ordering::Acquire);
        if start != 0 && (start..end).contains(&addr) {
            let page = addr & !(page_size() - 1);
            // SAFETY: [page, end) lies inside a live read-only private map this crate made
            // (registered until just before it is unmapped); MAP_FIXED replaces those pages with
            // anonymous zero pages, which is what a read past the new end of file gets.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    end - page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                s.tripped.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: hand over to the previous handler, or restore the default action and return, so
    // the faulting read runs again and ends the process as it would have without us.
    // SAFETY: PREVIOUS was written before this handler was installed; the calls below follow the
    // handler's registered signature (SA_SIGINFO or not).
    unsafe {
        let prev = *std::ptr::addr_of!(PREVIOUS);
        match prev {
            Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                if old.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(old.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_past_a_truncated_end_reads_zeros_and_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let page = page_size();
        std::fs::File::create(&p).unwrap().write_all(&vec![7u8; 4 * page]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: test file owned by this test; truncated below on purpose to exercise the guard.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let g = Guard::new(map.as_ptr(), map.len()).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        assert_eq!(map[page - 1], 7);
        assert!(!g.tripped());
        let tail: u64 = map[page..].iter().map(|&b| b as u64).sum();
        assert_eq!(tail, 0);
        assert!(g.tripped());
        drop(g);
        drop(map);
    }
}
