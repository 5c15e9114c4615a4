//! The error type of the NBD layer.

use std::ffi::CStr;
use std::fmt;

use libnbd_sys as sys;

/// An error from libnbd (or from checks made before calling it).
///
/// [`Error::is_fatal`] tells whether the connection is dead afterwards (the
/// server went away, broke the protocol, or did not answer in time): such a
/// connection must be discarded. A recoverable error (the server refused or
/// failed one request, e.g. EIO from the disk behind the export; or a bad
/// request caught before it was sent) leaves the connection usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    message: String,
    fatal: bool,
}

impl Error {
    /// A recoverable error.
    pub(super) fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
            fatal: false,
        }
    }

    /// An error after which the connection is dead.
    pub(super) fn fatal(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
            fatal: true,
        }
    }

    /// No reply within the command timeout (fatal).
    pub(super) fn timed_out(secs: f64) -> Self {
        Self::fatal(
            libc::ETIMEDOUT,
            format!("NBD server sent no reply for {secs} s (command timed out)"),
        )
    }

    pub(super) fn with_fatal(mut self, fatal: bool) -> Self {
        self.fatal = fatal;
        self
    }

    pub(super) fn with_errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    /// The error libnbd recorded for the last failed call on this thread
    /// (recoverable; the caller knows whether the handle died).
    pub(super) fn last() -> Self {
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
        Error::new(errno, message)
    }

    /// An OS error of our own (poll, dup, the reactor): fatal, the handle
    /// can no longer be driven.
    pub(super) fn os(e: std::io::Error) -> Self {
        Self::fatal(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }

    /// The errno libnbd reported (0 if none).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// libnbd's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when the connection is dead after this error and must be
    /// discarded; false when it stays usable.
    pub fn is_fatal(&self) -> bool {
        self.fatal
    }

    /// True when the server did not answer within the command timeout
    /// (always fatal).
    pub fn is_timeout(&self) -> bool {
        self.fatal && self.errno == libc::ETIMEDOUT
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
