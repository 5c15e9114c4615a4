//! Block status: extents of one or more meta contexts, and the C callback
//! libnbd reports them through.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use libnbd_sys as sys;
use parking_lot::Mutex;

use super::connection::Connection;
use super::error::{Error, Result};
use super::{MAX_BLOCK_STATUS, MAX_EXTENTS};

impl Connection {
    /// Block status of `offset..offset+len` for each of `contexts` (which must
    /// have been negotiated). Returns one list per context, in the order
    /// given: `(length, flags)` pairs as the server reports them, back to
    /// back from `offset`, covering the range exactly. Touching pairs may
    /// have equal flags (replies are not merged here; see `crate::extents`).
    /// Queries in steps of up to 4 GiB and continues from wherever the
    /// server's replies stop; each query waits at most the command timeout.
    /// Fails with `E2BIG` once the lists hold more than [`MAX_EXTENTS`]
    /// pairs together (memory: at most that many, 16 bytes each, plus one
    /// reply: qemu-nbd sends at most 131,072 pairs per context a reply).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        contexts: &[&str],
    ) -> Result<Vec<Vec<(u64, u32)>>> {
        self.block_status_at_most(offset, len, contexts, MAX_EXTENTS)
    }

    /// [`Connection::block_status`], failing with `E2BIG` once the lists
    /// hold more than `max` pairs together.
    pub(crate) fn block_status_at_most(
        &mut self,
        offset: u64,
        len: u64,
        contexts: &[&str],
        max: usize,
    ) -> Result<Vec<Vec<(u64, u32)>>> {
        self.check_range(offset, len)?;
        self.check_alive()?;
        // The server only answers for negotiated contexts; without this a
        // context that was never negotiated looks like a server that makes
        // no progress.
        for ctx in contexts {
            if !self.can_meta_context(ctx)? {
                return Err(Error::new(
                    libc::EINVAL,
                    format!("meta context {ctx} was not negotiated with the NBD server"),
                ));
            }
        }
        if contexts.is_empty() {
            return Ok(Vec::new());
        }
        let end = offset + len;
        // Shared with libnbd, which holds one reference per query until it
        // calls `release_state` (see `query`): whatever happens to this call,
        // the callback never sees freed memory.
        let state = Arc::new(Mutex::new(BlockStatusState {
            contexts: contexts.iter().map(|c| c.as_bytes().to_vec()).collect(),
            covered: vec![offset; contexts.len()],
            extents: vec![Vec::new(); contexts.len()],
            end,
            panicked: false,
        }));
        loop {
            let from = state.lock().covered.iter().copied().min().unwrap_or(end);
            if from >= end {
                break;
            }
            let count = (end - from).min(MAX_BLOCK_STATUS);
            self.query(&state, from, count)?;
            let s = state.lock();
            if s.panicked {
                return Err(Error::new(
                    libc::EIO,
                    "internal error in block status callback",
                ));
            }
            let held: usize = s.extents.iter().map(Vec::len).sum();
            if held > max {
                return Err(Error::new(
                    libc::E2BIG,
                    format!("more than {max} extents before offset {from}"),
                ));
            }
            let next = s.covered.iter().copied().min().unwrap_or(end);
            if next <= from {
                return Err(Error::new(
                    libc::EIO,
                    format!("NBD server made no block status progress at offset {from}"),
                ));
            }
        }
        let extents = std::mem::take(&mut state.lock().extents);
        Ok(extents)
    }

    /// One NBD BLOCK_STATUS command of `count` bytes at `from`, recorded
    /// into `state`; waits for it.
    fn query(&mut self, state: &Arc<Mutex<BlockStatusState>>, from: u64, count: u64) -> Result<()> {
        let callback = sys::nbd_extent_callback {
            callback: Some(extent_trampoline),
            user_data: Arc::into_raw(state.clone()) as *mut c_void,
            free: Some(release_state),
        };
        // SAFETY: valid handle. `user_data` is a reference of its own to the
        // state (Arc::into_raw), which libnbd gives back through `free`
        // exactly once when the callback can no longer be called, also when
        // this call fails; so the callback always sees live state, even if
        // this function returns early (timeout) and the command is freed
        // only by nbd_close. The trampoline catches panics.
        let cookie = unsafe {
            sys::nbd_aio_block_status(
                self.h(),
                count,
                from,
                callback,
                sys::nbd_completion_callback::default(),
                0,
            )
        };
        if cookie < 0 {
            return Err(self.last_error());
        }
        self.wait_all(&[cookie as u64])
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
    // SAFETY: user_data came from Arc::into_raw in `query`, and libnbd calls
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
    // SAFETY: user_data is the reference `query` gave libnbd, not released
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
