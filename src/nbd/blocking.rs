//! The blocking calls of an idle [`Connection`]: each starts its commands
//! (through `start_chunks`) and waits for all of them, at most the command
//! timeout for each reply. They return only once libnbd will never touch
//! their buffers again.

use std::collections::HashSet;
use std::ffi::c_void;
use std::time::Instant;

use libnbd_sys as sys;

use super::connection::Connection;
use super::error::{Error, Result};
use super::MAX_ZERO;

impl Connection {
    /// Fills `buf` from the export at `offset`, as commands of the largest
    /// size the server accepts.
    pub fn pread_into(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pread_pipelined(buf, offset, usize::MAX)
    }

    /// Writes `buf` to the export at `offset`, as commands of the largest
    /// size the server accepts.
    pub fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.pwrite_pipelined(buf, offset, usize::MAX)
    }

    /// Reads `buf` at `offset` with commands of `request_size` bytes (at
    /// most what the server accepts) all in flight at once on this one
    /// handle, which hides the per-request latency of the NBD server.
    pub fn pread_pipelined(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        request_size: usize,
    ) -> Result<()> {
        let base = buf.as_mut_ptr();
        let step = self.request_step(request_size);
        self.run_chunks(offset, buf.len() as u64, step, |h, pos, n, off| {
            // SAFETY: valid handle. pos + n <= buf.len() (start_chunks
            // splits exactly buf.len() bytes), so the n bytes at base + pos
            // lie inside `buf`, which stays mutably borrowed until
            // `run_chunks` returns; it returns only once libnbd will never
            // write into them again (see `wait_all`).
            unsafe {
                sys::nbd_aio_pread(
                    h,
                    base.add(pos as usize) as *mut c_void,
                    n as usize,
                    off,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            }
        })
    }

    /// Writes `buf` at `offset` with several commands in flight at once.
    /// Returns when every command has completed.
    pub fn pwrite_pipelined(&mut self, buf: &[u8], offset: u64, request_size: usize) -> Result<()> {
        let base = buf.as_ptr();
        let step = self.request_step(request_size);
        self.run_chunks(offset, buf.len() as u64, step, |h, pos, n, off| {
            // SAFETY: as in pread_pipelined; libnbd only reads the buffer.
            unsafe {
                sys::nbd_aio_pwrite(
                    h,
                    base.add(pos as usize) as *const c_void,
                    n as usize,
                    off,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            }
        })
    }

    /// Zeroes `len` bytes at `offset` (NBD WRITE_ZEROES), split into
    /// commands the protocol can carry. Fails if the server cannot zero; see
    /// [`Connection::can_zero`].
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run_chunks(offset, len, MAX_ZERO, |h, _, n, off| {
            // SAFETY: valid handle; plain integers, no buffer.
            unsafe { sys::nbd_aio_zero(h, n, off, sys::nbd_completion_callback::default(), 0) }
        })
    }

    /// NBD FLUSH: makes completed writes durable.
    pub fn flush(&mut self) -> Result<()> {
        self.check_alive()?;
        // SAFETY: valid handle; no buffer.
        let cookie =
            unsafe { sys::nbd_aio_flush(self.h(), sys::nbd_completion_callback::default(), 0) };
        if cookie < 0 {
            return Err(self.last_error());
        }
        self.wait_all(&[cookie as u64])
    }

    /// Starts the commands of a request (see `start_chunks`) and waits for
    /// every one that started. The first error wins: a refused start, else
    /// the first failed command.
    fn run_chunks(
        &mut self,
        offset: u64,
        len: u64,
        step: u64,
        start: impl FnMut(*mut sys::nbd_handle, u64, u64, u64) -> i64,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let mut cookies = Vec::with_capacity((len / step.max(1)) as usize + 1);
        let started = self.start_chunks(offset, len, step, start, |c, _, _| cookies.push(c));
        let waited = self.wait_all(&cookies);
        started.and(waited)
    }

    /// Waits until every command in `cookies` has completed and retires
    /// them; returns the first error among them. Returns early only when
    /// libnbd will never touch the commands' buffers again: the handle is
    /// dead (libnbd failed every command in flight), or it has been
    /// poisoned (a reply did not come within the command timeout, or the
    /// socket could not be polled): then its state machine never runs again
    /// and nbd_close frees the commands without touching their buffers.
    pub(super) fn wait_all(&mut self, cookies: &[u64]) -> Result<()> {
        let mut pending: HashSet<u64> = cookies.iter().copied().collect();
        let mut first_err: Option<Error> = None;
        let mut poll_err: Option<Error> = None;
        let timeout = self.command_timeout();
        let mut last_progress = Instant::now();
        while !pending.is_empty() {
            // Retire what has completed. peek names one completed command
            // at a time, so each costs O(1); asking about every pending
            // cookie after every poll was quadratic in the requests in flight.
            let before = pending.len();
            loop {
                // SAFETY: valid handle; only reads the list of done commands.
                let cookie = unsafe { sys::nbd_aio_peek_command_completed(self.h()) };
                if cookie == 0 {
                    break; // commands in flight, none completed yet
                }
                if cookie < 0 {
                    // Nothing in flight at all, yet `pending` is not empty:
                    // cannot happen, but ask about each rather than poll for
                    // replies that will never come.
                    pending.retain(|&c| {
                        // SAFETY: valid handle; the cookie came from this
                        // handle and was not retired yet.
                        let rc = unsafe { sys::nbd_aio_command_completed(self.h(), c) };
                        if rc < 0 && first_err.is_none() {
                            first_err = Some(self.last_error());
                        }
                        rc == 0
                    });
                    break;
                }
                // SAFETY: valid handle; the cookie came from this handle
                // (peek names only this handle's completed commands).
                let rc = unsafe { sys::nbd_aio_command_completed(self.h(), cookie as u64) };
                if rc < 0 && first_err.is_none() {
                    first_err = Some(self.last_error());
                }
                pending.remove(&(cookie as u64));
            }
            if pending.is_empty() {
                break;
            }
            if pending.len() < before {
                last_progress = Instant::now();
            }
            if self.is_dead() {
                // libnbd fails all in-flight commands when the handle dies,
                // so this is not expected either; a dead handle does no I/O.
                self.poison();
                return Err(first_err
                    .or(poll_err)
                    .unwrap_or_else(|| {
                        Error::fatal(
                            libc::ENOTCONN,
                            "NBD connection died with requests in flight",
                        )
                    })
                    .with_fatal(true));
            }
            let left = match timeout {
                None => None,
                Some(t) => match last_progress.checked_add(t) {
                    None => None,
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            // Returning hands the buffers back: the state
                            // machine must never run again.
                            self.poison();
                            return Err(Error::timed_out(t.as_secs_f64()));
                        }
                        Some(left)
                    }
                },
            };
            // Blocks until there is progress (in-flight commands always
            // bring a reply or a hang-up) or the deadline.
            if let Err(e) = self.poll_once(left) {
                if self.is_dead() {
                    // The server went away: libnbd has failed the commands
                    // in flight (ENOTCONN); retire them and report that.
                    poll_err.get_or_insert(e);
                    continue;
                }
                // The handle is alive but cannot be driven. Returning frees
                // (or hands back) the buffers of commands still in flight, so
                // libnbd must never run this handle's state machine again:
                // any later reply would be written into freed memory.
                self.poison();
                return Err(first_err.unwrap_or(e).with_fatal(true));
            }
        }
        let dead = self.is_dead();
        match first_err {
            Some(e) => Err(if dead { e.with_fatal(true) } else { e }),
            None => Ok(()),
        }
    }
}
