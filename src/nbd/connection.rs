//! The handle: connect (the handshake, driven with `poll(2)`: the one
//! blocking wait of this module), the export's flags, liveness.

use std::ffi::{c_int, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use libnbd_sys as sys;

use super::error::{Error, Result};
use super::MAX_REQUEST;

/// Where to connect and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions<'a> {
    /// Unix socket of the NBD server.
    pub socket: &'a Path,
    /// Export name; `None` is the server's default export (`""`).
    pub export: Option<&'a str>,
    /// Meta contexts to request during the handshake.
    pub meta_contexts: &'a [&'a str],
    /// Upper bound for connecting plus the handshake.
    pub timeout: Duration,
    /// Longest wait for the server's next reply while commands are in
    /// flight (`None`: no limit). When it passes, the call fails with a
    /// fatal ETIMEDOUT and the connection is dead from then on.
    pub command_timeout: Option<Duration>,
}

/// An open NBD connection with no command in flight.
///
/// It owns one `nbd_handle`, closed in `Drop`. It is `Send` (libnbd handles
/// may be used from any thread, one at a time) but not `Sync`: every call
/// that drives the handle takes `&mut self`. Commands are sent through a
/// [`super::Pipeline`], which owns the connection while any is in flight.
pub struct Connection {
    handle: NonNull<sys::nbd_handle>,
    size: u64,
    max_request: u64,
    command_timeout: Option<Duration>,
    /// Set once the handshake is done (see `last_error`).
    connected: bool,
    /// Set by the pipeline at its first fatal error (e.g. no reply within
    /// the command timeout, with commands still in flight): from then on
    /// nothing drives the handle's state machine again, and it counts as
    /// dead.
    poisoned: bool,
}

// SAFETY: a libnbd handle is not tied to the thread that created it; libnbd
// documents handles as usable from any thread (it locks internally). The
// wrapper is deliberately not `Sync`: all use that drives it goes through
// `&mut self`.
unsafe impl Send for Connection {}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(libc::EINVAL, format!("{what} contains a NUL byte")))
}

impl Connection {
    /// Connects to the NBD server on a Unix socket, selects the export and
    /// negotiates the requested meta contexts. Every error is fatal (there
    /// is no connection to keep).
    pub fn connect_unix(opts: &ConnectOptions<'_>) -> Result<Connection> {
        Self::connect(opts).map_err(|e| e.with_fatal(true))
    }

    fn connect(opts: &ConnectOptions<'_>) -> Result<Connection> {
        let path = opts
            .socket
            .to_str()
            .ok_or_else(|| Error::new(libc::EINVAL, "socket path is not valid UTF-8"))?;
        let c_path = cstring("socket path", path)?;
        // SAFETY: nbd_create has no preconditions; it returns NULL on failure.
        let raw = unsafe { sys::nbd_create() };
        let handle = NonNull::new(raw).ok_or_else(Error::last)?;
        // From here the handle is owned by `conn` and closed on every path.
        let mut conn = Connection {
            handle,
            size: 0,
            max_request: MAX_REQUEST,
            command_timeout: opts.command_timeout,
            connected: false,
            poisoned: false,
        };
        if let Some(export) = opts.export {
            let c_export = cstring("export name", export)?;
            // SAFETY: valid handle; libnbd copies the string.
            conn.check(unsafe { sys::nbd_set_export_name(conn.h(), c_export.as_ptr()) })?;
        }
        // Read buffers are only handed out after a successful read (and are
        // always initialised Rust memory), so libnbd need not zero each one
        // before every read: that memset cost as much as a copy of the data.
        // SAFETY: valid handle; plain flag.
        conn.check(unsafe { sys::nbd_set_pread_initialize(conn.h(), false) })?;
        for ctx in opts.meta_contexts {
            let c_ctx = cstring("meta context", ctx)?;
            // SAFETY: valid handle; libnbd copies the string.
            conn.check(unsafe { sys::nbd_add_meta_context(conn.h(), c_ctx.as_ptr()) })?;
        }
        // SAFETY: valid handle and NUL-terminated path; libnbd makes and owns
        // the socket (no fd of ours is handed over).
        conn.check(unsafe { sys::nbd_aio_connect_unix(conn.h(), c_path.as_ptr()) })?;
        conn.wait_connected(opts.timeout)?;
        // SAFETY: valid, connected handle.
        let size = unsafe { sys::nbd_get_size(conn.h()) };
        if size < 0 {
            return Err(Error::last());
        }
        conn.size = size as u64;
        // SAFETY: valid, connected handle.
        let max = unsafe { sys::nbd_get_block_size(conn.h(), sys::LIBNBD_SIZE_MAXIMUM as c_int) };
        if max > 0 {
            conn.max_request = (max as u64).min(MAX_REQUEST);
        }
        conn.connected = true;
        Ok(conn)
    }

    /// The raw handle, for the calls of this module.
    pub(super) fn h(&self) -> *mut sys::nbd_handle {
        self.handle.as_ptr()
    }

    pub(super) fn check(&self, rc: c_int) -> Result<()> {
        if rc < 0 {
            Err(self.last_error())
        } else {
            Ok(())
        }
    }

    /// libnbd's error for the last failed call on this handle, fatal when
    /// the handle is dead now. libnbd refuses commands on a dead handle with
    /// EINVAL ("invalid state: DEAD"); that (or, once connected, no errno at
    /// all) is reported as ENOTCONN here, so
    /// callers can tell a lost connection from a bad request of their own
    /// (which is also EINVAL).
    pub(super) fn last_error(&self) -> Error {
        let err = Error::last();
        if !self.is_dead() {
            return err;
        }
        // libnbd reports some hang-ups ("server disconnected unexpectedly")
        // without an errno: after the handshake that is ENOTCONN too (a
        // failed handshake keeps libnbd's own account).
        let errno = match err.errno() {
            libc::EINVAL => libc::ENOTCONN,
            0 if self.connected => libc::ENOTCONN,
            e => e,
        };
        err.with_errno(errno).with_fatal(true)
    }

    /// Fails with a fatal ENOTCONN, without calling libnbd, once the handle
    /// is dead.
    pub fn check_alive(&self) -> Result<()> {
        if self.is_dead() {
            Err(Error::fatal(
                libc::ENOTCONN,
                "NBD connection is dead (the server closed it, broke the protocol or timed out)",
            ))
        } else {
            Ok(())
        }
    }

    /// From now on the handle counts as dead and its state machine is never
    /// run again (not even to disconnect): commands may be in flight on
    /// buffers that are gone.
    pub(super) fn poison(&mut self) {
        self.poisoned = true;
    }

    /// The longest wait for a reply (see [`ConnectOptions::command_timeout`]).
    pub(crate) fn command_timeout(&self) -> Option<Duration> {
        self.command_timeout
    }

    fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: valid handle; these only read the state machine.
            let (connecting, ready) = unsafe {
                (
                    sys::nbd_aio_is_connecting(self.h()),
                    sys::nbd_aio_is_ready(self.h()),
                )
            };
            if ready == 1 {
                return Ok(());
            }
            if connecting != 1 {
                // Dead or closed: libnbd has recorded why (or we say it).
                let err = Error::last();
                if err.message().is_empty() || err.message() == "unknown libnbd error" {
                    return Err(Error::fatal(libc::ECONNREFUSED, "NBD handshake failed"));
                }
                return Err(err.with_fatal(true));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::fatal(
                    libc::ETIMEDOUT,
                    format!("NBD connect timed out after {} s", timeout.as_secs_f64()),
                ));
            }
            self.poll_once(Some(left))?;
        }
    }

    /// Waits up to `timeout` (`None`: without limit) for the socket to be
    /// ready in the direction libnbd waits for, and tells libnbd (during the
    /// handshake). This is
    /// what nbd_poll does, except that a hang-up (POLLHUP/POLLERR) is
    /// delivered in the direction the state machine waits for. libnbd 1.14's
    /// nbd_poll always treats a hang-up as readable; in a state that only
    /// waits to write (connect(2) in progress, when a peer accepts and closes
    /// at once) that fails with "external event 0 is invalid in state
    /// CONNECT.START" (EINVAL) instead of libnbd seeing and reporting the
    /// disconnect.
    fn poll_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        if self.poisoned {
            return self.check_alive();
        }
        // SAFETY: valid handle; these only read the state machine.
        let (fd, dir) = unsafe {
            (
                sys::nbd_aio_get_fd(self.h()),
                sys::nbd_aio_get_direction(self.h()),
            )
        };
        if fd < 0 {
            return Err(self.last_error());
        }
        let wants_read = dir & sys::LIBNBD_AIO_DIRECTION_READ != 0;
        let wants_write = dir & sys::LIBNBD_AIO_DIRECTION_WRITE != 0;
        if !wants_read && !wants_write {
            return Err(Error::fatal(
                libc::EIO,
                "NBD handle is not waiting for the server",
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: if wants_read { libc::POLLIN } else { 0 }
                | if wants_write { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        let ms = match timeout {
            None => -1,
            // Rounded up, so a wait never ends before the deadline.
            Some(t) => t.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as c_int,
        };
        // SAFETY: one valid pollfd. The fd is the handle's socket, which
        // stays open during the call: we hold &mut self, so no other libnbd
        // call on this handle can close it.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                _ => Err(Error::os(err)),
            };
        }
        if n == 0 {
            return Ok(());
        }
        let hangup = pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
        let rc = if wants_read && (pfd.revents & libc::POLLIN != 0 || hangup) {
            // SAFETY: valid handle, and the state machine waits for a read.
            unsafe { sys::nbd_aio_notify_read(self.h()) }
        } else if wants_write && (pfd.revents & libc::POLLOUT != 0 || hangup) {
            // SAFETY: valid handle, and the state machine waits for a write.
            unsafe { sys::nbd_aio_notify_write(self.h()) }
        } else {
            0
        };
        self.check(rc)
    }

    fn flag(&self, rc: c_int) -> Result<bool> {
        if rc < 0 {
            Err(self.last_error())
        } else {
            Ok(rc != 0)
        }
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Largest read/write request this connection sends in one NBD command.
    pub fn max_request(&self) -> u64 {
        self.max_request
    }

    pub fn is_read_only(&self) -> Result<bool> {
        // SAFETY: valid, connected handle; only reads the handshake result.
        self.flag(unsafe { sys::nbd_is_read_only(self.h()) })
    }

    pub fn can_flush(&self) -> Result<bool> {
        // SAFETY: valid, connected handle; only reads the handshake result.
        self.flag(unsafe { sys::nbd_can_flush(self.h()) })
    }

    pub fn can_zero(&self) -> Result<bool> {
        // SAFETY: valid, connected handle; only reads the handshake result.
        self.flag(unsafe { sys::nbd_can_zero(self.h()) })
    }

    pub fn can_multi_conn(&self) -> Result<bool> {
        // SAFETY: valid, connected handle; only reads the handshake result.
        self.flag(unsafe { sys::nbd_can_multi_conn(self.h()) })
    }

    /// Whether the server agreed to the meta context `name` in the handshake.
    pub fn can_meta_context(&self, name: &str) -> Result<bool> {
        let c = cstring("meta context", name)?;
        // SAFETY: valid handle, NUL-terminated name; only reads state.
        self.flag(unsafe { sys::nbd_can_meta_context(self.h(), c.as_ptr()) })
    }

    /// True once the connection can no longer be used (server gone, protocol
    /// error, a command timed out): such a connection must not be reused.
    pub fn is_dead(&self) -> bool {
        if self.poisoned {
            return true;
        }
        // SAFETY: valid handle; these only read the state machine.
        unsafe { sys::nbd_aio_is_dead(self.h()) == 1 || sys::nbd_aio_is_closed(self.h()) == 1 }
    }

    /// Checks, without a round trip, that an idle connection is still usable:
    /// not dead, and the server has not closed the socket (an idle NBD
    /// socket with nothing in flight has nothing to read unless it hung up).
    pub(crate) fn probe_alive(&self) -> bool {
        if self.is_dead() {
            return false;
        }
        // SAFETY: valid handle; these only read state.
        let (fd, in_flight) = unsafe {
            (
                sys::nbd_aio_get_fd(self.h()),
                sys::nbd_aio_in_flight(self.h()),
            )
        };
        if fd < 0 || in_flight != 0 {
            return fd >= 0;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout. The fd is libnbd's open
        // socket: the handle is alive and &self keeps any libnbd call that
        // could close it from running meanwhile.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc == 0
    }

    /// Fails with EINVAL unless `offset..offset+len` lies inside the export.
    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(
                libc::EINVAL,
                format!(
                    "request {offset}+{len} is beyond the end of the export ({})",
                    self.size
                ),
            )),
        }
    }

    /// The size of the commands a request is split into: `request_size`,
    /// but at least 4 KiB and at most what the server accepts.
    pub(super) fn request_step(&self, request_size: usize) -> u64 {
        let max = self.max_request.max(1);
        (request_size as u64).clamp(4096.min(max), max)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nothing else refers to it. When the
        // connection is up with nothing in flight, NBD_CMD_DISC is queued
        // (sent at once into the socket, without waiting for the server:
        // this may run on an async worker); never on a poisoned handle,
        // whose state machine must not run again (commands may be in flight
        // on released buffers). nbd_close closes the socket and frees the
        // handle and every command it still holds (queued, in flight, or
        // completed and not retired). It reads and writes none of those
        // commands' data buffers and calls none of our callbacks but the
        // `free` of each command's callbacks: of ours, only block status'
        // `release_state` (block_status.rs), which drops that command's own
        // reference to its state (from Arc::into_raw, so still valid; the
        // state goes too when that was the last) and touches nothing else;
        // the completion callbacks we pass are empty, without a `free`.
        // Buffers of a Pipeline's commands are freed only after this (see
        // `Pipeline`'s `Drop`).
        unsafe {
            if !self.poisoned
                && sys::nbd_aio_in_flight(self.h()) == 0
                && sys::nbd_aio_is_ready(self.h()) == 1
            {
                sys::nbd_aio_disconnect(self.h(), 0);
            }
            sys::nbd_close(self.h());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(socket: &Path, export: Option<&'static str>) -> ConnectOptions<'static> {
        ConnectOptions {
            socket: Box::leak(socket.to_path_buf().into_boxed_path()),
            export,
            meta_contexts: &[],
            timeout: Duration::from_secs(5),
            command_timeout: None,
        }
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let err = Connection::connect_unix(&opts(Path::new("/nonexistent/dir/nbd.sock"), None))
            .err()
            .expect("connecting to a missing socket must fail");
        assert_eq!(err.errno(), libc::ENOENT, "{err}");
        assert!(err.is_fatal());
    }

    #[test]
    fn nul_in_export_name_is_rejected() {
        let err = Connection::connect_unix(&opts(Path::new("/tmp/x.sock"), Some("a\0b")))
            .err()
            .expect("NUL in export must fail");
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.message().contains("NUL"), "{err}");
    }
}
