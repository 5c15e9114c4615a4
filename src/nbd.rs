//! A safe connection to an NBD server through the system libnbd.
//!
//! [`Connection`] owns one `nbd_handle`. It is `Send` (libnbd handles may be
//! used from any thread, one at a time) but not `Sync`: every call takes
//! `&mut self`, so two threads can never drive the same handle at once.
//! The handle is closed in `Drop`. All `unsafe` of the project that talks to
//! libnbd lives in this file.
//!
//! Besides the synchronous calls, a connection keeps a queue of commands in
//! flight for async callers ([`Connection::queue_read`],
//! [`Connection::queue_write`], [`Connection::queue_zero`],
//! [`Connection::queue_flush`]), retired oldest first by
//! [`Connection::poll_oldest`], which drives libnbd's non-blocking state
//! machine from a tokio reactor ([`Connection::register`]). Each queued
//! command owns the buffer libnbd reads into or writes from, and the
//! connection keeps it until libnbd has retired the command or the handle is
//! closed, so no caller can free a buffer libnbd still uses.

use std::collections::{HashSet, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libnbd_sys as sys;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `base:allocation`: the standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// qemu's allocation depth context (0 = not allocated in any layer).
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = sys::LIBNBD_STATE_HOLE;
/// `base:allocation` flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = sys::LIBNBD_STATE_ZERO;
/// `qemu:dirty-bitmap:*` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// The largest single read or write request we send. libnbd refuses requests
/// above 64 MiB; qemu-nbd advertises 32 MiB.
const MAX_REQUEST: u64 = 32 * 1024 * 1024;
/// The largest zero request: the NBD protocol carries 32-bit lengths.
const MAX_ZERO: u64 = 1 << 30;
/// The largest block status request (32-bit length, kept 1 MiB aligned).
const MAX_BLOCK_STATUS: u64 = (1 << 32) - (1 << 20);

/// An error from libnbd (or from checks made here before calling it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    message: String,
}

impl Error {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }

    /// The error libnbd recorded for the last failed call on this thread.
    fn last() -> Self {
        // SAFETY: nbd_get_error returns a thread-local string owned by libnbd
        // (or NULL); we copy it before any other libnbd call could replace it.
        let message = unsafe {
            let p = sys::nbd_get_error();
            if p.is_null() {
                "unknown libnbd error".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        // SAFETY: nbd_get_errno only reads thread-local state.
        let errno = unsafe { sys::nbd_get_errno() };
        Error { errno, message }
    }

    /// The errno libnbd reported (0 if none).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// libnbd's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno != 0 {
            write!(
                f,
                "{} ({})",
                self.message,
                std::io::Error::from_raw_os_error(self.errno)
            )
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// One extent of a block status reply: `length` bytes from `offset` with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Appends `e` to `list`, merging it into the last extent when they touch and
/// have the same flags.
pub fn push_extent(list: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = list.last_mut() {
        if last.end() == e.offset && last.flags == e.flags {
            last.length += e.length;
            return;
        }
    }
    list.push(e);
}

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
}

/// A request [`Connection::poll_oldest`] retired successfully.
#[derive(Debug)]
pub enum Retired {
    /// The last request of a read: its buffer, and how many bytes at its
    /// start were read.
    Read(Vec<u8>, usize),
    /// Any other request, with the bytes it wrote or zeroed (0 for a flush
    /// or an earlier part of a read).
    Done(u64),
}

/// What a queued command owns while libnbd may use it.
enum Owned {
    /// The buffer a read fills (its first `len` bytes).
    Read(Vec<u8>, usize),
    /// The bytes a write sends.
    Write(Bytes),
    /// Nothing: an earlier part of a read (the buffer is with the last
    /// part), or a flush.
    Nothing,
    /// Nothing, for a zero of this many bytes.
    Zero(u64),
}

/// A command in flight and what it owns.
struct Queued {
    cookie: u64,
    owned: Owned,
}

/// An open NBD connection. See the module documentation.
pub struct Connection {
    handle: NonNull<sys::nbd_handle>,
    size: u64,
    max_request: u64,
    /// Set when a call had to return with commands still in flight on a live
    /// handle; from then on nothing may drive the handle (see `wait_all`).
    poisoned: bool,
    /// Commands in flight, oldest first. Dropped only after `nbd_close`
    /// (fields drop after `Drop::drop`), or once libnbd retired them.
    queue: VecDeque<Queued>,
    /// The socket's registration with a tokio reactor, if any; always
    /// dropped before the handle is closed.
    reactor: Option<AsyncFd<c_int>>,
}

// SAFETY: a libnbd handle is not tied to the thread that created it; libnbd
// documents handles as usable from any thread (it locks internally). The
// wrapper is deliberately not `Sync`: all use goes through `&mut self`.
unsafe impl Send for Connection {}

fn io_error(e: std::io::Error) -> Error {
    Error::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
}

/// Whether `fd` is readable (or writable) right now: a zero-timeout poll.
fn socket_ready(fd: c_int, write: bool) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: if write { libc::POLLOUT } else { libc::POLLIN },
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; the fd stays owned by libnbd.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(libc::EINVAL, format!("{what} contains a NUL byte")))
}

impl Connection {
    /// Connects to the NBD server on a Unix socket, selects the export and
    /// negotiates the requested meta contexts.
    pub fn connect_unix(opts: &ConnectOptions<'_>) -> Result<Connection> {
        let path = opts.socket.to_str().ok_or_else(|| {
            Error::new(libc::EINVAL, "socket path is not valid UTF-8".to_string())
        })?;
        let c_path = cstring("socket path", path)?;
        // SAFETY: nbd_create has no preconditions; it returns NULL on failure.
        let raw = unsafe { sys::nbd_create() };
        let handle = NonNull::new(raw).ok_or_else(Error::last)?;
        // From here the handle is owned by `conn` and closed on every path.
        let mut conn = Connection {
            handle,
            size: 0,
            max_request: MAX_REQUEST,
            poisoned: false,
            queue: VecDeque::new(),
            reactor: None,
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
        Ok(conn)
    }

    fn h(&self) -> *mut sys::nbd_handle {
        self.handle.as_ptr()
    }

    fn check(&self, rc: c_int) -> Result<()> {
        if rc < 0 {
            Err(self.last_error())
        } else {
            Ok(())
        }
    }

    /// libnbd's error for the last failed call on this handle. libnbd refuses
    /// commands on a dead handle with EINVAL ("invalid state: DEAD"); that is
    /// reported as ENOTCONN here, so callers can tell a lost connection from
    /// a bad request of their own (which is also EINVAL).
    fn last_error(&self) -> Error {
        let mut err = Error::last();
        if err.errno == libc::EINVAL && self.is_dead() {
            err.errno = libc::ENOTCONN;
        }
        err
    }

    /// Fails with ENOTCONN, without calling libnbd, once the handle is dead.
    fn check_alive(&self) -> Result<()> {
        if self.is_dead() {
            Err(Error::new(
                libc::ENOTCONN,
                "NBD connection is dead (the server closed it or broke the protocol)",
            ))
        } else {
            Ok(())
        }
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
                if err.message.is_empty() || err.message == "unknown libnbd error" {
                    return Err(Error::new(libc::ECONNREFUSED, "NBD handshake failed"));
                }
                return Err(err);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    libc::ETIMEDOUT,
                    format!("NBD connect timed out after {} s", timeout.as_secs_f64()),
                ));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as c_int;
            self.poll_once(ms)?;
        }
    }

    /// Waits up to `timeout_ms` (-1: without limit) for the socket to be ready
    /// in the direction libnbd waits for, and tells libnbd. This is what
    /// nbd_poll does, except that a hang-up (POLLHUP/POLLERR) is delivered in
    /// the direction the state machine waits for. libnbd 1.14's nbd_poll
    /// always treats a hang-up as readable; in a state that only waits to
    /// write (connect(2) in progress, when a peer accepts and closes at once)
    /// that fails with "external event 0 is invalid in state CONNECT.START"
    /// (EINVAL) instead of libnbd seeing and reporting the disconnect.
    fn poll_once(&mut self, timeout_ms: c_int) -> Result<()> {
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
            return Err(Error::new(
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
        // SAFETY: one valid pollfd. The fd is the handle's socket, which
        // stays open during the call: we hold &mut self, so no other libnbd
        // call on this handle can close it.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                errno => Err(Error::new(
                    errno.unwrap_or(libc::EIO),
                    format!("poll: {err}"),
                )),
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
        // SAFETY: valid, connected handle.
        self.flag(unsafe { sys::nbd_is_read_only(self.h()) })
    }

    pub fn can_flush(&self) -> Result<bool> {
        // SAFETY: valid, connected handle.
        self.flag(unsafe { sys::nbd_can_flush(self.h()) })
    }

    pub fn can_zero(&self) -> Result<bool> {
        // SAFETY: valid, connected handle.
        self.flag(unsafe { sys::nbd_can_zero(self.h()) })
    }

    pub fn can_multi_conn(&self) -> Result<bool> {
        // SAFETY: valid, connected handle.
        self.flag(unsafe { sys::nbd_can_multi_conn(self.h()) })
    }

    /// Whether the server agreed to the meta context `name` in the handshake.
    pub fn can_meta_context(&self, name: &str) -> Result<bool> {
        let c = cstring("meta context", name)?;
        // SAFETY: valid handle, NUL-terminated name.
        self.flag(unsafe { sys::nbd_can_meta_context(self.h(), c.as_ptr()) })
    }

    /// True once the connection can no longer be used (server gone, protocol
    /// error): such a connection must not be reused.
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
    pub fn probe_alive(&self) -> bool {
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
        // SAFETY: one valid pollfd, zero timeout; the fd stays owned by libnbd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc == 0
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
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

    /// Fills `buf` from the export at `offset`, split into requests the server accepts.
    pub fn pread_into(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.check_alive()?;
        let step = self.max_request as usize;
        let mut off = offset;
        for chunk in buf.chunks_mut(step) {
            // SAFETY: valid handle; `chunk` is a live, writable buffer of
            // exactly chunk.len() bytes for the whole (synchronous) call.
            let rc = unsafe {
                sys::nbd_pread(
                    self.h(),
                    chunk.as_mut_ptr() as *mut c_void,
                    chunk.len(),
                    off,
                    0,
                )
            };
            self.check(rc)?;
            off += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes `buf` to the export at `offset`, split into requests the server accepts.
    pub fn pwrite(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.check_alive()?;
        let step = self.max_request as usize;
        let mut off = offset;
        for chunk in buf.chunks(step) {
            // SAFETY: valid handle; `chunk` is a live buffer of chunk.len()
            // bytes for the whole (synchronous) call; libnbd only reads it.
            let rc = unsafe {
                sys::nbd_pwrite(
                    self.h(),
                    chunk.as_ptr() as *const c_void,
                    chunk.len(),
                    off,
                    0,
                )
            };
            self.check(rc)?;
            off += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads `buf` at `offset` with several requests of `request_size` bytes in
    /// flight at once on this one handle (libnbd's asynchronous API), which
    /// hides the per-request latency of the NBD server.
    pub fn pread_pipelined(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        request_size: usize,
    ) -> Result<()> {
        let base = buf.as_mut_ptr();
        self.pipelined(buf.len(), offset, request_size, |h, pos, n, off| {
            // SAFETY: pos + n <= buf.len(), so the n bytes at base + pos lie
            // inside `buf`, which stays mutably borrowed until `pipelined`
            // returns; it returns only after every command retired or the
            // handle died, so libnbd never writes into freed memory.
            unsafe {
                sys::nbd_aio_pread(
                    h,
                    base.add(pos) as *mut c_void,
                    n,
                    off,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            }
        })
    }

    /// Writes `buf` at `offset` with several requests in flight at once.
    /// Returns when every request has completed.
    pub fn pwrite_pipelined(&mut self, buf: &[u8], offset: u64, request_size: usize) -> Result<()> {
        let base = buf.as_ptr();
        self.pipelined(buf.len(), offset, request_size, |h, pos, n, off| {
            // SAFETY: as in pread_pipelined; libnbd only reads the buffer.
            unsafe {
                sys::nbd_aio_pwrite(
                    h,
                    base.add(pos) as *const c_void,
                    n,
                    off,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            }
        })
    }

    /// Issues `len` bytes from `offset` as commands of at most `request_size`
    /// bytes (`issue(handle, pos, n, offset)` starts one and returns its
    /// cookie), then waits for all of them.
    fn pipelined(
        &mut self,
        len: usize,
        offset: u64,
        request_size: usize,
        mut issue: impl FnMut(*mut sys::nbd_handle, usize, usize, u64) -> i64,
    ) -> Result<()> {
        self.check_range(offset, len as u64)?;
        self.check_alive()?;
        // Never panics: max_request is at least 1 whatever the server advertises.
        let step = request_size.max(4096).min(self.max_request.max(1) as usize);
        let mut cookies = Vec::with_capacity(len / step + 1);
        let mut first_err = None;
        let mut pos = 0;
        while pos < len {
            let n = step.min(len - pos);
            let cookie = issue(self.h(), pos, n, offset + pos as u64);
            if cookie < 0 {
                first_err = Some(self.last_error());
                break;
            }
            cookies.push(cookie as u64);
            pos += n;
        }
        let waited = self.wait_all(&cookies);
        first_err.map_or(waited, Err)
    }

    /// Waits until every command in `cookies` has completed and retires
    /// them; returns the first error among them. Returns early only when
    /// libnbd will never touch the commands' buffers again: the handle is
    /// dead, or it has been poisoned (see below).
    fn wait_all(&mut self, cookies: &[u64]) -> Result<()> {
        let mut pending: HashSet<u64> = cookies.iter().copied().collect();
        let mut first_err: Option<Error> = None;
        let mut poll_err: Option<Error> = None;
        while !pending.is_empty() {
            // Retire what has completed. peek names one completed command
            // at a time, so each costs O(1); asking about every pending
            // cookie after every poll was quadratic in the requests in flight.
            loop {
                // SAFETY: valid handle.
                let cookie = unsafe { sys::nbd_aio_peek_command_completed(self.h()) };
                if cookie == 0 {
                    break; // commands in flight, none completed yet
                }
                if cookie < 0 {
                    // Nothing in flight at all, yet `pending` is not empty:
                    // cannot happen, but ask about each rather than poll for
                    // replies that will never come.
                    pending.retain(|&c| {
                        // SAFETY: valid handle; the cookie came from this handle.
                        let rc = unsafe { sys::nbd_aio_command_completed(self.h(), c) };
                        if rc < 0 && first_err.is_none() {
                            first_err = Some(self.last_error());
                        }
                        rc == 0
                    });
                    break;
                }
                // SAFETY: valid handle; the cookie came from this handle.
                let rc = unsafe { sys::nbd_aio_command_completed(self.h(), cookie as u64) };
                if rc < 0 && first_err.is_none() {
                    first_err = Some(self.last_error());
                }
                pending.remove(&(cookie as u64));
            }
            if pending.is_empty() {
                break;
            }
            if self.is_dead() {
                // libnbd fails all in-flight commands when the handle dies,
                // so this is not expected either; a dead handle does no I/O.
                return Err(first_err.or(poll_err).unwrap_or_else(|| {
                    Error::new(
                        libc::ENOTCONN,
                        "NBD connection died with requests in flight",
                    )
                }));
            }
            // Blocks until there is progress (in-flight commands always
            // bring a reply or a hang-up).
            if let Err(e) = self.poll_once(-1) {
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
                self.poisoned = true;
                return Err(first_err.unwrap_or(e));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Commands queued and not yet retired by [`Connection::poll_oldest`].
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a read of `len` bytes at `offset` into the start of `buf`, as
    /// requests of at most `piece` bytes (and of what the server accepts);
    /// the filled buffer comes back from [`Connection::poll_oldest`] when the
    /// last of them retires. `len` must not exceed `buf.len()`. On error
    /// nothing more is queued; requests already queued keep the buffer.
    pub fn queue_read(
        &mut self,
        mut buf: Vec<u8>,
        len: usize,
        offset: u64,
        piece: usize,
    ) -> Result<()> {
        self.check_range(offset, len as u64)?;
        self.check_alive()?;
        if len > buf.len() {
            return Err(Error::new(
                libc::EINVAL,
                format!("read of {len} bytes into a buffer of {}", buf.len()),
            ));
        }
        let step = piece.clamp(1, self.max_request.max(1) as usize);
        let base = buf.as_mut_ptr();
        let mut cookies = Vec::with_capacity(len / step + 1);
        let mut failed = None;
        let mut pos = 0;
        while pos < len {
            let n = step.min(len - pos);
            // SAFETY: valid handle; pos + n <= len <= buf.len(), so the n
            // bytes at base + pos lie inside `buf`'s initialised heap block.
            // The Vec is moved into the queue below without touching that
            // block, behind every command that points into it (the queue
            // retires in order), and stays there until libnbd retired them
            // all or the handle is closed: libnbd never writes into freed
            // memory.
            let cookie = unsafe {
                sys::nbd_aio_pread(
                    self.h(),
                    base.add(pos) as *mut c_void,
                    n,
                    offset + pos as u64,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            };
            if cookie < 0 {
                failed = Some(self.last_error());
                break;
            }
            cookies.push(cookie as u64);
            pos += n;
        }
        if let Some((&last, parts)) = cookies.split_last() {
            for &cookie in parts {
                self.queue.push_back(Queued {
                    cookie,
                    owned: Owned::Nothing,
                });
            }
            self.queue.push_back(Queued {
                cookie: last,
                owned: Owned::Read(buf, len),
            });
        }
        failed.map_or(Ok(()), Err)
    }

    /// Queues a write of `data` at `offset` as requests of at most `piece`
    /// bytes (and of what the server accepts). The bytes are kept until the
    /// commands retire.
    pub fn queue_write(&mut self, data: Bytes, offset: u64, piece: usize) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.check_alive()?;
        let step = piece.clamp(1, self.max_request.max(1) as usize);
        let mut done = 0;
        while done < data.len() {
            let n = step.min(data.len() - done);
            let piece = data.slice(done..done + n);
            // SAFETY: valid handle; `piece` points at `n` bytes that stay
            // alive and unchanged (Bytes is immutable) while the queue keeps
            // it, i.e. until libnbd retired the command or the handle is
            // closed. libnbd only reads them.
            let cookie = unsafe {
                sys::nbd_aio_pwrite(
                    self.h(),
                    piece.as_ptr() as *const c_void,
                    n,
                    offset + done as u64,
                    sys::nbd_completion_callback::default(),
                    0,
                )
            };
            if cookie < 0 {
                return Err(self.last_error());
            }
            self.queue.push_back(Queued {
                cookie: cookie as u64,
                owned: Owned::Write(piece),
            });
            done += n;
        }
        Ok(())
    }

    /// Queues NBD WRITE_ZEROES of `len` bytes at `offset`, split into
    /// requests the protocol can carry. The server must be able to zero
    /// ([`Connection::can_zero`]).
    pub fn queue_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_alive()?;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let n = MAX_ZERO.min(end - off);
            // SAFETY: valid handle; plain integers, no buffer.
            let cookie = unsafe {
                sys::nbd_aio_zero(self.h(), n, off, sys::nbd_completion_callback::default(), 0)
            };
            if cookie < 0 {
                return Err(self.last_error());
            }
            self.queue.push_back(Queued {
                cookie: cookie as u64,
                owned: Owned::Zero(n),
            });
            off += n;
        }
        Ok(())
    }

    /// Queues NBD FLUSH: once it retires, every write that retired before
    /// it was queued is durable.
    pub fn queue_flush(&mut self) -> Result<()> {
        self.check_alive()?;
        // SAFETY: valid handle; no buffer.
        let cookie =
            unsafe { sys::nbd_aio_flush(self.h(), sys::nbd_completion_callback::default(), 0) };
        if cookie < 0 {
            return Err(self.last_error());
        }
        self.queue.push_back(Queued {
            cookie: cookie as u64,
            owned: Owned::Nothing,
        });
        Ok(())
    }

    /// Registers the socket with the tokio reactor of the calling thread, so
    /// that [`Connection::poll_oldest`] can wait for it. Must be called
    /// inside a tokio runtime; registering twice is a no-op. The
    /// registration ends with [`Connection::deregister`] or the connection.
    pub fn register(&mut self) -> Result<()> {
        if self.reactor.is_some() {
            return Ok(());
        }
        // SAFETY: valid handle; only reads state.
        let fd = unsafe { sys::nbd_aio_get_fd(self.h()) };
        if fd < 0 {
            return Err(self.last_error());
        }
        // SAFETY: `fd` is libnbd's socket for this handle. It stays open and
        // the same until nbd_close, and the registration is dropped before
        // that: by `deregister`, or first thing in `Drop`. Moving the
        // Connection moves the registration with it.
        let afd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| io_error(e.into_parts().1))?;
        self.reactor = Some(afd);
        Ok(())
    }

    /// Ends the registration made by [`Connection::register`] (before the
    /// connection is pooled: another worker's reactor may use it next).
    pub fn deregister(&mut self) {
        self.reactor = None;
    }

    /// Retires the oldest queued command once it has completed, driving
    /// libnbd's non-blocking state machine whenever its socket is ready;
    /// never blocks. Needs [`Connection::register`]. The last request of a
    /// read gives back the filled buffer; see [`Retired`]. A failed
    /// command is an error (and is retired). When the connection dies the
    /// command stays queued (its buffer is freed with the connection) and
    /// every later call fails too.
    pub fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<Result<Retired>> {
        let Some(cookie) = self.queue.front().map(|q| q.cookie) else {
            return Poll::Ready(Err(Error::new(libc::EINVAL, "no NBD command queued")));
        };
        loop {
            // SAFETY: valid handle; the cookie came from this handle and has
            // not been retired (it is still in the queue).
            let rc = unsafe { sys::nbd_aio_command_completed(self.h(), cookie) };
            if rc != 0 {
                // Retired (successfully or not): libnbd no longer uses the
                // buffer, so it may leave the queue.
                let err = (rc < 0).then(|| self.last_error());
                let q = self.queue.pop_front().expect("front checked above");
                if let Some(e) = err {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(match q.owned {
                    Owned::Read(buf, len) => Retired::Read(buf, len),
                    Owned::Write(data) => Retired::Done(data.len() as u64),
                    Owned::Zero(n) => Retired::Done(n),
                    Owned::Nothing => Retired::Done(0),
                }));
            }
            if self.is_dead() {
                return Poll::Ready(Err(Error::new(
                    libc::ESHUTDOWN,
                    "NBD connection died with requests in flight",
                )));
            }
            let Some(afd) = self.reactor.as_ref() else {
                return Poll::Ready(Err(Error::new(
                    libc::EINVAL,
                    "NBD connection not registered",
                )));
            };
            // SAFETY: valid handle; only reads state.
            let dir = unsafe { sys::nbd_aio_get_direction(self.h()) };
            let want_write = dir & sys::LIBNBD_AIO_DIRECTION_WRITE != 0;
            let want_read = dir & sys::LIBNBD_AIO_DIRECTION_READ != 0;
            let mut ready = None;
            if want_write {
                match afd.poll_write_ready(cx) {
                    Poll::Ready(Ok(g)) => ready = Some((g, true)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(e))),
                    Poll::Pending => {}
                }
            }
            if ready.is_none() && want_read {
                match afd.poll_read_ready(cx) {
                    Poll::Ready(Ok(g)) => ready = Some((g, false)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(e))),
                    Poll::Pending => {}
                }
            }
            let Some((mut guard, write)) = ready else {
                if !want_read && !want_write {
                    return Poll::Ready(Err(Error::new(
                        libc::EIO,
                        "NBD connection waits for nothing with a command in flight",
                    )));
                }
                return Poll::Pending;
            };
            // SAFETY: valid handle; libnbd does non-blocking I/O on its own
            // socket and writes only into buffers the queue owns.
            let rc = unsafe {
                if write {
                    sys::nbd_aio_notify_write(self.h())
                } else {
                    sys::nbd_aio_notify_read(self.h())
                }
            };
            if let Err(e) = self.check(rc) {
                return Poll::Ready(Err(e));
            }
            // libnbd may stop before the socket would block (e.g. after a
            // whole reply), and the reactor's readiness is edge-triggered:
            // forget readiness only when the socket really is not ready.
            if !socket_ready(*guard.get_ref().get_ref(), write) {
                guard.clear_ready();
            }
        }
    }

    /// Zeroes `len` bytes at `offset` (NBD WRITE_ZEROES), split into requests
    /// the protocol can carry. Fails if the server cannot zero; see
    /// [`Connection::can_zero`].
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_alive()?;
        let step = MAX_ZERO.min(self.size.max(1));
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = step.min(end - off);
            // SAFETY: valid handle; plain integers.
            self.check(unsafe { sys::nbd_zero(self.h(), n, off, 0) })?;
            off += n;
        }
        Ok(())
    }

    /// NBD FLUSH: makes completed writes durable.
    pub fn flush(&mut self) -> Result<()> {
        self.check_alive()?;
        // SAFETY: valid handle.
        self.check(unsafe { sys::nbd_flush(self.h(), 0) })
    }

    /// Block status of `offset..offset+len` for each of `contexts` (which must
    /// have been negotiated). Returns one extent list per context, in the
    /// order given, each covering the range exactly, in order, with adjacent
    /// extents of equal flags merged. Queries in steps of up to 4 GiB and
    /// continues from wherever the server's replies stop.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        contexts: &[&str],
    ) -> Result<Vec<Vec<Extent>>> {
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
        let end = offset + len;
        let mut state = BlockStatusState {
            contexts: contexts.iter().map(|c| c.as_bytes().to_vec()).collect(),
            covered: vec![offset; contexts.len()],
            extents: vec![Vec::new(); contexts.len()],
            end,
            panicked: false,
        };
        if contexts.is_empty() {
            return Ok(Vec::new());
        }
        loop {
            let from = state.covered.iter().copied().min().unwrap_or(end);
            if from >= end {
                break;
            }
            let count = (end - from).min(MAX_BLOCK_STATUS);
            let callback = sys::nbd_extent_callback {
                callback: Some(extent_trampoline),
                user_data: &mut state as *mut BlockStatusState as *mut c_void,
                free: None,
            };
            // SAFETY: valid handle. `user_data` points to `state`, which lives
            // on this stack frame for the whole synchronous call; `free` is
            // None, so libnbd never frees it. The trampoline catches panics.
            let rc = unsafe { sys::nbd_block_status(self.h(), count, from, callback, 0) };
            if state.panicked {
                return Err(Error::new(
                    libc::EIO,
                    "internal error in block status callback",
                ));
            }
            self.check(rc)?;
            let next = state.covered.iter().copied().min().unwrap_or(end);
            if next <= from {
                return Err(Error::new(
                    libc::EIO,
                    format!("NBD server made no block status progress at offset {from}"),
                ));
            }
        }
        Ok(state.extents)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The reactor must forget the socket before libnbd closes it.
        self.reactor = None;
        // SAFETY: we own the handle and nothing else refers to it. The
        // buffers of queued commands are freed only after nbd_close (fields
        // drop after this body). When the connection is up and idle,
        // NBD_CMD_DISC is queued (sent at once into the socket, without
        // waiting for the server: this may run on an async worker), except
        // on a poisoned handle, whose state machine must not run again (it
        // may have commands in flight on released buffers); nbd_close only
        // closes the socket and frees, it reads nothing.
        unsafe {
            if !self.poisoned && self.queue.is_empty() && sys::nbd_aio_is_ready(self.h()) == 1 {
                sys::nbd_aio_disconnect(self.h(), 0);
            }
            sys::nbd_close(self.h());
        }
    }
}

struct BlockStatusState {
    contexts: Vec<Vec<u8>>,
    covered: Vec<u64>,
    extents: Vec<Vec<Extent>>,
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

    fn record_one(&mut self, i: usize, offset: u64, entries: &[u32]) {
        let mut start = offset;
        for pair in entries.chunks_exact(2) {
            let len = u64::from(pair[0]);
            let flags = pair[1];
            let stop = start.saturating_add(len).min(self.end);
            let from = start.max(self.covered[i]);
            if stop > from {
                push_extent(
                    &mut self.extents[i],
                    Extent {
                        offset: from,
                        length: stop - from,
                        flags,
                    },
                );
                self.covered[i] = stop;
            }
            start = start.saturating_add(len);
            if start >= self.end {
                break;
            }
        }
    }
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
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: user_data is the &mut BlockStatusState passed by
        // block_status, alive and not otherwise borrowed during the call.
        let state = unsafe { &mut *(user_data as *mut BlockStatusState) };
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
        state.record(name, offset, list);
    }));
    match result {
        Ok(()) => 0,
        Err(_) => {
            // SAFETY: as above; only a flag is set.
            unsafe {
                (*(user_data as *mut BlockStatusState)).panicked = true;
                if !error.is_null() {
                    *error = libc::EIO;
                }
            }
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_extent_merges_touching_equal_flags() {
        let mut v = Vec::new();
        push_extent(
            &mut v,
            Extent {
                offset: 0,
                length: 10,
                flags: 0,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 10,
                length: 5,
                flags: 0,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 15,
                length: 5,
                flags: 3,
            },
        );
        push_extent(
            &mut v,
            Extent {
                offset: 20,
                length: 0,
                flags: 0,
            },
        );
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    flags: 0
                },
                Extent {
                    offset: 15,
                    length: 5,
                    flags: 3
                }
            ]
        );
    }

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
        assert_eq!(
            s.extents[0],
            vec![
                Extent {
                    offset: 100,
                    length: 50,
                    flags: 0
                },
                Extent {
                    offset: 150,
                    length: 150,
                    flags: 3
                }
            ]
        );
        assert_eq!(s.covered, vec![300]);
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let err = Connection::connect_unix(&ConnectOptions {
            socket: Path::new("/nonexistent/dir/nbd.sock"),
            export: None,
            meta_contexts: &[],
            timeout: Duration::from_secs(5),
        })
        .err()
        .expect("connecting to a missing socket must fail");
        assert_eq!(err.errno(), libc::ENOENT, "{err}");
    }

    #[test]
    fn nul_in_export_name_is_rejected() {
        let err = Connection::connect_unix(&ConnectOptions {
            socket: Path::new("/tmp/x.sock"),
            export: Some("a\0b"),
            meta_contexts: &[],
            timeout: Duration::from_secs(5),
        })
        .err()
        .expect("NUL in export must fail");
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.message().contains("NUL"), "{err}");
    }
}
