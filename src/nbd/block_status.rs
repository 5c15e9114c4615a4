//! Block status: one request of extents of one or more meta contexts
//! ([`BlockStatus`], whose commands [`super::Pipeline::block_status`]
//! sends), and the C callback libnbd reports them through.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use libnbd_sys as sys;
use parking_lot::Mutex;

use super::connection::Connection;
use super::error::{Error, Result};
use super::MAX_BLOCK_STATUS;

/// One block status request in progress: the commands to send (see
/// [`BlockStatus::next`]), and the lists their replies fill. Each command
/// shares the lists with libnbd's callback (see [`BlockStatus::start`]).
pub(super) struct BlockStatus {
    state: Arc<Mutex<BlockStatusState>>,
    /// The most pairs the lists may hold together.
    max: usize,
    /// Where the last command started.
    last: Option<u64>,
}

impl BlockStatus {
    /// A block status request of `offset..offset+len` for each of
    /// `contexts`, which must lie inside the export and have been
    /// negotiated (else EINVAL; the server only answers for negotiated
    /// contexts, and one never negotiated would look like a server that
    /// makes no progress).
    pub(super) fn new(
        conn: &Connection,
        offset: u64,
        len: u64,
        contexts: &[&str],
        max: usize,
    ) -> Result<BlockStatus> {
        conn.check_range(offset, len)?;
        conn.check_alive()?;
        for ctx in contexts {
            if !conn.can_meta_context(ctx)? {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("meta context {ctx} was not negotiated with the NBD server"),
                ));
            }
        }
        // No context: nothing to ask (the lists are complete).
        let end = if contexts.is_empty() {
            offset
        } else {
            offset + len
        };
        Ok(BlockStatus {
            state: Arc::new(Mutex::new(BlockStatusState {
                contexts: contexts.iter().map(|c| c.as_bytes().to_vec()).collect(),
                covered: vec![offset; contexts.len()],
                extents: vec![Vec::new(); contexts.len()],
                end,
                panicked: false,
            })),
            max,
            last: None,
        })
    }

    /// The next command to send, `(from, count)`, once the replies to the
    /// last one are recorded; `None` when the lists cover the range. Fails
    /// when the callback panicked (EIO), the lists hold more than `max`
    /// pairs (E2BIG), or the last command's replies did not cover more of
    /// the least covered list (EIO).
    pub(super) fn next(&mut self) -> Result<Option<(u64, u64)>> {
        let s = self.state.lock();
        if let Some(from) = self.last {
            if s.panicked {
                return Err(Error::new(
                    libc::EIO,
                    "internal error in block status callback",
                ));
            }
            let held: usize = s.extents.iter().map(Vec::len).sum();
            if held > self.max {
                return Err(Error::new(
                    libc::E2BIG,
                    format!("more than {} extents before offset {from}", self.max),
                ));
            }
            let next = s.covered.iter().copied().min().unwrap_or(s.end);
            if next <= from {
                return Err(Error::new(
                    libc::EIO,
                    format!("NBD server made no block status progress at offset {from}"),
                ));
            }
        }
        let from = s.covered.iter().copied().min().unwrap_or(s.end);
        if from >= s.end {
            return Ok(None);
        }
        self.last = Some(from);
        Ok(Some((from, (s.end - from).min(MAX_BLOCK_STATUS))))
    }

    /// Starts one NBD BLOCK_STATUS command of `count` bytes at `from` on
    /// `conn`, whose replies the callback records; returns its cookie.
    pub(super) fn start(&self, conn: &Connection, from: u64, count: u64) -> Result<u64> {
        let callback = sys::nbd_extent_callback {
            callback: Some(extent_trampoline),
            user_data: Arc::into_raw(self.state.clone()) as *mut c_void,
            free: Some(release_state),
        };
        // SAFETY: valid handle. `user_data` is a reference of its own to the
        // state (Arc::into_raw), which libnbd gives back through `free`
        // exactly once when the callback can no longer be called, also when
        // this call fails; so the callback always sees live state, however
        // long the command outlives this request (it is freed at the latest
        // by nbd_close). The trampoline catches panics.
        let cookie = unsafe {
            sys::nbd_aio_block_status(
                conn.h(),
                count,
                from,
                callback,
                sys::nbd_completion_callback::default(),
                0,
            )
        };
        if cookie < 0 {
            return Err(conn.last_error());
        }
        Ok(cookie as u64)
    }

    /// The lists, once [`BlockStatus::next`] said they cover the range.
    pub(super) fn finish(self) -> Vec<Vec<(u64, u32)>> {
        std::mem::take(&mut self.state.lock().extents)
    }
}

struct BlockStatusState {
    contexts: Vec<Vec<u8>>,
    /// Per context: where its list ends so far.
    covered: Vec<u64>,
    /// Per context: `(length, flags)` from the queried offset.
    extents: Vec<Vec<(u64, u32)>>,
    end: u64,
    panicked: bool,
}

impl BlockStatusState {
    /// Records a reply for `metacontext` into every list asking for it (a
    /// context may be given more than once).
    fn record(&mut self, metacontext: &[u8], offset: u64, entries: &[u32]) {
        for i in 0..self.contexts.len() {
            if self.contexts[i] == metacontext {
                self.record_one(i, offset, entries);
            }
        }
    }

    /// Appends the part of a reply (for a query at `offset`) beyond what
    /// the list covers. A query starts where the least covered list ends,
    /// so a reply never starts beyond the end of a list.
    fn record_one(&mut self, i: usize, offset: u64, entries: &[u32]) {
        let mut start = offset;
        for pair in entries.chunks_exact(2) {
            let len = u64::from(pair[0]);
            let flags = pair[1];
            let stop = start.saturating_add(len).min(self.end);
            let from = start.max(self.covered[i]);
            if stop > from && start <= self.covered[i] {
                self.extents[i].push((stop - from, flags));
                self.covered[i] = stop;
            }
            start = start.saturating_add(len);
            if start >= self.end {
                break;
            }
        }
    }
}

/// libnbd's `free` for the state: drops its reference.
unsafe extern "C" fn release_state(user_data: *mut c_void) {
    // SAFETY: user_data came from Arc::into_raw in `BlockStatus::start`, and libnbd calls
    // `free` exactly once for it.
    drop(unsafe { Arc::from_raw(user_data as *const Mutex<BlockStatusState>) });
}

/// The C callback libnbd calls for each context of a block status reply.
/// Never unwinds into C: a panic is caught and reported as an error.
unsafe extern "C" fn extent_trampoline(
    user_data: *mut c_void,
    metacontext: *const c_char,
    offset: u64,
    entries: *mut u32,
    nr_entries: usize,
    error: *mut c_int,
) -> c_int {
    // SAFETY: user_data is the reference `BlockStatus::start` gave libnbd, not released
    // before the last call of this callback (libnbd calls `free` after it).
    let state = unsafe { &*(user_data as *const Mutex<BlockStatusState>) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        if metacontext.is_null() || (entries.is_null() && nr_entries > 0) {
            return;
        }
        // SAFETY: libnbd passes a NUL-terminated context name and an array
        // of nr_entries u32 valid for the duration of the callback.
        let (name, list) = unsafe {
            (
                CStr::from_ptr(metacontext).to_bytes(),
                if nr_entries == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(entries, nr_entries)
                },
            )
        };
        state.lock().record(name, offset, list);
    }));
    match result {
        Ok(()) => 0,
        Err(_) => {
            state.lock().panicked = true;
            if !error.is_null() {
                // SAFETY: libnbd passes a valid int to report an error in.
                unsafe { *error = libc::EIO };
            }
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_clips_to_end_and_skips_covered() {
        let mut s = BlockStatusState {
            contexts: vec![b"base:allocation".to_vec()],
            covered: vec![100],
            extents: vec![Vec::new()],
            end: 300,
            panicked: false,
        };
        // A reply starting before what is covered and running past the end.
        s.record(b"base:allocation", 50, &[100, 0, 500, 3]);
        s.record(b"other", 0, &[1000, 1]);
        assert_eq!(s.extents[0], vec![(50, 0), (150, 3)]);
        assert_eq!(s.covered, vec![300]);
        // A reply beyond the end of the list would leave a gap: ignored.
        s.end = 500;
        s.record(b"base:allocation", 301, &[10, 0]);
        assert_eq!(s.covered, vec![300]);
        // Touching replies with equal flags stay apart.
        s.record(b"base:allocation", 300, &[10, 3]);
        assert_eq!(s.extents[0], vec![(50, 0), (150, 3), (10, 3)]);
    }
}
