//! The one loop that splits a request into NBD commands: every read, write
//! and zero of a [`super::Pipeline`] starts its commands here.

use libnbd_sys as sys;

use super::connection::Connection;
use super::error::Result;

impl Connection {
    /// Starts the `len` bytes at `offset` as commands of at most `step`
    /// bytes, in order. For each piece, `start(handle, pos, n, offset + pos)`
    /// starts the command for bytes `pos..pos + n` of the request and
    /// returns libnbd's cookie (negative: failed), and `started(cookie, pos,
    /// n)` records it. Checks the range and that the handle is alive first.
    /// Stops at the first command libnbd refuses and returns its error; the
    /// commands started before it stay in flight (the caller recorded them).
    /// Starts nothing for `len == 0`.
    pub(super) fn start_chunks(
        &mut self,
        offset: u64,
        len: u64,
        step: u64,
        mut start: impl FnMut(*mut sys::nbd_handle, u64, u64, u64) -> i64,
        mut started: impl FnMut(u64, u64, u64),
    ) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_alive()?;
        let step = step.max(1);
        let mut pos = 0;
        while pos < len {
            let n = step.min(len - pos);
            let cookie = start(self.h(), pos, n, offset + pos);
            if cookie < 0 {
                return Err(self.last_error());
            }
            started(cookie as u64, pos, n);
            pos += n;
        }
        Ok(())
    }
}
