//! Backends: where a transfer's bytes live. A transfer
//! ([`crate::transfers::Transfer`]) opens an [`Opened`] that the operations
//! read, write, zero and flush through, whatever the storage kind.
//!
//! Opening blocks (connect, open(2)): do it on the blocking pool. An NBD
//! connection's commands then run on the async worker that opened it
//! (`nbd_export`); file I/O runs on the blocking pool.

pub(crate) mod file;
pub mod nbd_export;
mod storage;

pub(crate) use storage::{Storage, Unflushed};

use std::fmt;

use crate::config::BackendConfig;
use crate::extents::Extent;

/// What went wrong in a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BackendError {
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

pub(crate) type Result<T> = std::result::Result<T, BackendError>;

/// What a backend can do: OPTIONS advertises it, and requests for what it
/// cannot do are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Writes are refused.
    pub(crate) read_only: bool,
    /// Ranges can be made to read as zeroes without sending them.
    pub(crate) can_zero: bool,
    pub(crate) can_flush: bool,
    /// Allocation (and dirty) extents can be listed.
    pub(crate) extents: bool,
    /// Writes at an offset (`Content-Range` PUT, PATCH); without them a
    /// write replaces the whole image (see [`Writer`]).
    pub(crate) ranged_writes: bool,
}

impl Caps {
    /// The file backend: reads, whole-file uploads, fsync.
    pub(crate) const FILE: Caps = Caps {
        read_only: false,
        can_zero: false,
        can_flush: true,
        extents: false,
        ranged_writes: false,
    };

    /// The most an NBD export offers; its own flags may take away writes,
    /// zero and flush (see [`Opened::caps`]).
    pub(crate) const NBD_MOST: Caps = Caps {
        read_only: false,
        can_zero: true,
        can_flush: true,
        extents: true,
        ranged_writes: true,
    };
}

/// What a backend can do as far as its config tells, without opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KnownCaps {
    /// All of it (the file backend).
    All(Caps),
    /// At most this; the open backend tells the rest (an NBD export).
    AtMost(Caps),
}

impl KnownCaps {
    pub(crate) fn of(backend: &BackendConfig) -> KnownCaps {
        match backend {
            BackendConfig::File { .. } => KnownCaps::All(Caps::FILE),
            BackendConfig::Nbd { .. } => KnownCaps::AtMost(Caps::NBD_MOST),
        }
    }

    /// The most the backend can do: what it lacks here, it lacks whatever
    /// its image.
    pub(crate) fn at_most(self) -> Caps {
        match self {
            KnownCaps::All(c) | KnownCaps::AtMost(c) => c,
        }
    }
}

/// A backend opened for a write request (see [`Storage::open_writer`]).
pub(crate) enum Writer {
    /// Writes at offsets into the image (NBD).
    At(nbd_export::ExportConn),
    /// A new image written from its start, replacing the old one only once
    /// complete (the file backend).
    Replace(file::FileUpload),
}

impl Writer {
    /// What the backend can do (read-only, zero, ...).
    pub(crate) fn caps(&self) -> Result<Caps> {
        match self {
            Writer::At(h) => h.caps(),
            Writer::Replace(_) => Ok(Caps::FILE),
        }
    }

    /// The size that writes must fit in; `None` for a replacing writer,
    /// whose new image is as long as what is written.
    pub(crate) fn size(&self) -> Option<u64> {
        match self {
            Writer::At(h) => Some(h.size()),
            Writer::Replace(_) => None,
        }
    }
}

/// The storage opened for one request. NBD commands run on the async
/// worker that opened it (see [`nbd_export::ExportConn`]); file I/O, which
/// blocks, on the blocking pool.
pub(crate) enum Opened {
    Nbd(nbd_export::ExportConn),
    File(file::FileHandle),
}

/// Runs blocking file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| BackendError::Io("file I/O thread panicked".into()))?
}

impl Opened {
    /// Image size in bytes.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Opened::Nbd(h) => h.size(),
            Opened::File(h) => h.size(),
        }
    }

    pub(crate) fn caps(&self) -> Result<Caps> {
        match self {
            Opened::Nbd(h) => h.caps(),
            Opened::File(_) => Ok(Caps::FILE),
        }
    }

    /// Reads `len` bytes at `offset` into the start of `buf`, which comes
    /// back filled.
    pub(crate) async fn read_at(
        &mut self,
        buf: Vec<u8>,
        len: usize,
        offset: u64,
    ) -> Result<Vec<u8>> {
        match self {
            Opened::Nbd(h) => h.read_at(buf, len, offset).await,
            Opened::File(h) => {
                let h = h.clone();
                let mut buf = buf;
                blocking(move || {
                    let Some(part) = buf.get_mut(..len) else {
                        return Err(BackendError::Io("read larger than its buffer".into()));
                    };
                    h.read_at(part, offset).map(|()| buf)
                })
                .await
            }
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub(crate) async fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Opened::Nbd(h) => h.zero(offset, len).await,
            Opened::File(_) => Err(BackendError::Io(
                "zero is not supported by the file backend".into(),
            )),
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<()> {
        match self {
            Opened::Nbd(h) => h.flush().await,
            Opened::File(h) => {
                let h = h.clone();
                blocking(move || h.flush()).await
            }
        }
    }

    /// Allocation extents covering the whole image (`zero` = hole or zero).
    pub(crate) async fn allocation_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Opened::Nbd(h) => h.allocation_extents().await,
            Opened::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Extents whose `zero` flag guarantees the range reads as zeroes (no
    /// such knowledge for files: one data extent).
    pub(crate) async fn reads_as_zero_extents(&mut self) -> Result<Vec<Extent>> {
        match self {
            Opened::Nbd(h) => h.reads_as_zero_extents().await,
            Opened::File(h) => Ok(crate::extents::whole(h.size(), false)),
        }
    }

    /// Allocation extents merged with the configured dirty bitmap, or `None`
    /// when no bitmap is configured or the server did not offer it.
    pub(crate) async fn dirty_extents(
        &mut self,
    ) -> Result<Option<Vec<crate::extents::DirtyExtent>>> {
        match self {
            Opened::Nbd(h) => h.dirty_extents().await,
            Opened::File(_) => Ok(None),
        }
    }

    /// Marks the handle as not reusable (an error left it in an unknown state).
    pub(crate) fn discard(&mut self) {
        if let Opened::Nbd(h) = self {
            h.discard();
        }
    }
}
