//! Every operation on a transfer's storage: read (the GET stream), write
//! (a request body into the backend's [`Writer`]), zero, flush, extents and
//! checksum. Handlers parse and validate, take the limits and locks, and
//! call one of these; what fails is an [`OpError`], which the HTTP layer
//! turns into its response. Memory per request is bounded by a few
//! fixed-size buffers whatever the image size.
//!
//! NBD transfers run on the HTTP worker's own event loop: libnbd's
//! non-blocking API keeps `WINDOW` requests in flight on the connection
//! while the worker moves earlier chunks to or from the client socket. No
//! thread hand-off sits in the data path, and a buffer filled from one socket
//! is still in this core's cache when it is copied to the other. A GET reads
//! in a task of its own on the worker, so qemu-nbd keeps being served while
//! the client socket is full. Every NBD command (read, write, zero, flush,
//! block status, a checksum's reads) goes through the connection's
//! pipeline (`backend::nbd_export::ExportConn`); the blocking pool only
//! opens the storage (connect) and does file I/O, which may block.
//!
//! One file per job: `read` (the GET stream), `write` (a request body into
//! the backend), `simple` (zero, extents, checksum and flush: one backend
//! call each). What they share is here: the error, the log line, opening
//! the storage, the buffer pool and the sizes.

mod read;
mod simple;
mod write;

pub(crate) use read::{read_stream, Stalled};
pub(crate) use simple::{checksum, extents, flush, zero, ExtentList};
pub(crate) use write::write;

use std::sync::Arc;
use std::time::Instant;

use actix_web::rt::task::spawn_blocking;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::backend::nbd_export::{ExportConn, Retired};
use crate::backend::{BackendError, Opened, Writer};
use crate::direct_body::{BodyError, ChunkBuffers};
use crate::transfers::Transfer;

/// Why an operation failed. The HTTP layer turns each into its response
/// (`From<OpError> for ApiError` in `crate::http::error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpError {
    /// The client sent no body bytes for the body timeout, `received`
    /// bytes into the body.
    BodyTimeout { received: u64 },
    /// The request body ended after `received` bytes, short of its length.
    BodyEnded { received: u64 },
    /// The backend failed (or the request lies beyond the image end).
    Backend(BackendError),
    /// A write to a read-only image.
    ReadOnly,
    /// An offset at or past the end of the image.
    OffsetPastEnd,
    /// What the backend cannot do.
    NotSupported(&'static str),
    /// A blocking task of the operation panicked.
    Internal,
}

impl From<BodyError> for OpError {
    fn from(e: BodyError) -> OpError {
        match e {
            BodyError::Timeout { received } => OpError::BodyTimeout { received },
            BodyError::Ended { received } => OpError::BodyEnded { received },
        }
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> OpError {
        OpError::Backend(e)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::BodyTimeout { received } => write!(
                f,
                "timed out waiting for the request body after {received} bytes"
            ),
            OpError::BodyEnded { received } => {
                write!(f, "request body ended early at {received} bytes")
            }
            OpError::Backend(e) => e.fmt(f),
            OpError::ReadOnly => f.write_str("image is read-only"),
            OpError::OffsetPastEnd => f.write_str("offset must be less than image size"),
            OpError::NotSupported(what) => f.write_str(what),
            OpError::Internal => f.write_str("internal error"),
        }
    }
}

impl std::error::Error for OpError {}

/// Runs blocking backend work on the blocking pool.
pub(crate) async fn blocking<T, E, F>(f: F) -> Result<T, E>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<OpError> + Send + 'static,
{
    spawn_blocking(f)
        .await
        .map_err(|_| E::from(OpError::Internal))?
}

/// Opens the transfer's storage for one request, once it is the request's
/// turn (only a not-multi-conn NBD export makes requests of a transfer take
/// turns; see `crate::backend::nbd_export`).
pub(crate) async fn open(t: &Arc<Transfer>) -> Result<Opened, OpError> {
    let turn = t.storage().turn().await;
    let s = t.storage().clone();
    blocking(move || s.open_in_turn(turn).map_err(OpError::from)).await
}

/// Opens the transfer's storage for a write request, in its turn (see
/// [`open`]); a read-only image is [`OpError::ReadOnly`].
pub(crate) async fn open_writer(t: &Arc<Transfer>) -> Result<Writer, OpError> {
    let turn = t.storage().turn().await;
    let s = t.storage().clone();
    let writer = blocking(move || s.open_writer(turn).map_err(OpError::from)).await?;
    if writer.caps()?.read_only {
        return Err(OpError::ReadOnly);
    }
    Ok(writer)
}

/// Waits until no command of `queue` is in flight, handing each that
/// retires to `retired`. A fatal error (the connection died or timed out)
/// ends the wait: nothing more can retire then. A request that stops early
/// calls it before it gives back what it holds, so that nothing it started
/// outlives it.
async fn retire_all(queue: &mut ExportConn, retired: impl FnMut(Retired)) {
    let _ = queue.settle(retired).await;
}

/// Bytes per buffer of a transfer, and per body piece handed to actix: each
/// piece is one socket write, and 512 KiB writes cost less CPU than 64 KiB
/// ones. The backend reads a chunk as several NBD requests (see
/// `backend::nbd_export::PIPELINE_REQUEST`) and writes it as one.
pub(crate) const CHUNK: usize = 512 * 1024;
/// NBD requests a GET or PUT keeps in flight on the NBD connection it holds
/// (2 MiB of reads, 4 MiB of writes): hides qemu-nbd's per-request latency
/// (it serves the requests of one connection concurrently).
const WINDOW: usize = 8;
/// Chunks read ahead of the client (beyond those in flight).
const DEPTH: usize = 2;

/// Logs the start of an operation and, when dropped, its end with the bytes
/// moved and the duration (`image_server.py`'s `… start` / `… end` lines).
pub(crate) struct OpLog {
    op: &'static str,
    id: String,
    started: Instant,
    pub bytes: u64,
    /// For a write: the body bytes read straight from the stream.
    pub direct: Option<u64>,
}

impl OpLog {
    pub(crate) fn start(op: &'static str, id: &str, detail: std::fmt::Arguments<'_>) -> OpLog {
        log::info!("{op} start image_id={id} {detail}");
        OpLog {
            op,
            id: id.to_string(),
            started: Instant::now(),
            bytes: 0,
            direct: None,
        }
    }
}

impl Drop for OpLog {
    fn drop(&mut self) {
        let direct = match self.direct {
            Some(n) => format!(" direct_bytes={n}"),
            None => String::new(),
        };
        log::info!(
            "{} end image_id={} bytes={} duration_s={:.3}{direct}",
            self.op,
            self.id,
            self.bytes,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A buffer lent out as `Bytes` (by a GET to actix, by a PUT to libnbd);
/// dropped, it goes back to its transfer for reuse.
struct LentBuffer {
    buf: Vec<u8>,
    len: usize,
    home: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for LentBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for LentBuffer {
    fn drop(&mut self) {
        self.home.lock().push(std::mem::take(&mut self.buf));
    }
}

/// The buffers of one transfer: reused once their `Bytes` are dropped, so
/// at most as many exist as are in use at once. The one given back last is
/// reused first: it is the likeliest to be in the CPU's cache still.
struct Buffers {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    size: usize,
}

impl Buffers {
    fn new(size: usize) -> Buffers {
        Buffers {
            free: Arc::default(),
            size,
        }
    }

    /// A buffer of `size` initialised bytes.
    fn get(&self) -> Vec<u8> {
        self.free.lock().pop().unwrap_or_else(|| vec![0; self.size])
    }

    fn lend(&self, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(LentBuffer {
            buf,
            len,
            home: self.free.clone(),
        })
    }
}

/// A write's body is read into the request's buffers.
impl ChunkBuffers for Buffers {
    fn size(&self) -> usize {
        self.size
    }

    fn empty(&self) -> Vec<u8> {
        let mut v = self.free.lock().pop().unwrap_or_default();
        v.clear();
        v.reserve_exact(self.size);
        v
    }
}
