//! Backends: where a transfer's bytes live. A transfer
//! ([`crate::transfers::Transfer`]) opens a [`Handle`] that the operations
//! read, write, zero and flush through, whatever the storage kind.
//!
//! Everything here blocks: call it from a blocking thread, never from an
//! async worker.

pub mod file;
pub mod nbd;

use std::fmt;

use crate::extents::Extent;

/// What went wrong in a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The storage could not be reached (NBD connect/handshake failed,
    /// file missing): nothing was done.
    Unavailable(String),
    /// An I/O error while working on the storage.
    Io(String),
    /// The storage did not answer within the NBD command timeout
    /// (`--nbd-timeout`); its connection was discarded.
    Timeout(String),
    /// The request lies (partly) beyond the end of the image.
    OutOfRange { size: u64 },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unavailable(m) => write!(f, "backend unavailable: {m}"),
            BackendError::Io(m) => write!(f, "backend I/O error: {m}"),
            BackendError::Timeout(m) => write!(f, "backend timed out: {m}"),
            BackendError::OutOfRange { size } => write!(f, "beyond the end of the image ({size})"),
        }
    }
}

impl std::error::Error for BackendError {}

pub type Result<T> = std::result::Result<T, BackendError>;

/// What a backend can do, as advertised by OPTIONS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub read_only: bool,
    pub can_zero: bool,
    pub can_flush: bool,
}

/// An open backend, used by one request at a time.
pub enum Handle {
    Nbd(nbd::NbdHandle),
    File(file::FileHandle),
}

impl Handle {
    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Handle::Nbd(h) => h.size(),
            Handle::File(h) => h.size(),
        }
    }

    pub fn caps(&self) -> Result<Caps> {
        match self {
            Handle::Nbd(h) => h.caps(),
            Handle::File(_) => Ok(Caps {
                read_only: false,
                can_zero: false,
                can_flush: true,
            }),
        }
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.read_at(buf, offset),
            Handle::File(h) => h.read_at(buf, offset),
        }
    }

    /// Writes `buf` at `offset` (never past the end of the image).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.write_at(buf, offset),
            Handle::File(_) => Err(BackendError::Io(
                "ranged writes are not supported by the file backend".into(),
            )),
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.zero(offset, len),
            Handle::File(_) => Err(BackendError::Io(
                "zero is not supported by the file backend".into(),
            )),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        match self {
            Handle::Nbd(h) => h.flush(),
            Handle::File(h) => h.flush(),
        }
    }

    /// Allocation extents covering the whole image (`zero` = hole or zero).
    pub fn allocation_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Handle::Nbd(h) => h.allocation_extents(),
            Handle::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Extents whose `zero` flag guarantees the range reads as zeroes (no
    /// such knowledge for files: one data extent).
    pub fn reads_as_zero_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Handle::Nbd(h) => h.reads_as_zero_extents(),
            Handle::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Allocation extents merged with the configured dirty bitmap, or `None`
    /// when no bitmap is configured or the server did not offer it.
    pub fn dirty_extents(&mut self) -> Result<Option<Vec<crate::extents::DirtyExtent>>> {
        match self {
            Handle::Nbd(h) => h.dirty_extents(),
            Handle::File(_) => Ok(None),
        }
    }

    /// Marks the handle as not reusable (an error left it in an unknown state).
    pub fn discard(&mut self) {
        if let Handle::Nbd(h) = self {
            h.discard();
        }
    }
}
