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
//! the client socket is full. File transfers, whose reads and writes may
//! block, run on the blocking pool.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use actix_web::rt::task::spawn_blocking;
use actix_web::web::Payload;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::file::FileUpload;
use crate::backend::nbd::{NbdHandle, NbdQueue};
use crate::backend::{BackendError, Handle, Writer};
use crate::checksum;
use crate::direct_body::Inbox;
use crate::extents::{self, DirtyExtent, Extent};
use crate::nbd::Retired;
use crate::stats::TransferStats;
use crate::transfers::{Lease, Transfer};
use crate::zeroes::is_zero;

/// Why an operation failed. The HTTP layer turns each into its response
/// (`From<OpError> for ApiError` in `crate::http::error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
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
pub async fn blocking<T, E, F>(f: F) -> Result<T, E>
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
/// turns; see `crate::backend::nbd`).
pub async fn open(t: &Arc<Transfer>) -> Result<Handle, OpError> {
    let turn = t.storage().turn().await;
    let s = t.storage().clone();
    blocking(move || s.open_in_turn(turn).map_err(OpError::from)).await
}

/// Opens the transfer's storage for a write request, in its turn (see
/// [`open`]); a read-only image is [`OpError::ReadOnly`].
pub async fn open_writer(t: &Arc<Transfer>) -> Result<Writer, OpError> {
    let turn = t.storage().turn().await;
    let s = t.storage().clone();
    let writer = blocking(move || s.open_writer(turn).map_err(OpError::from)).await?;
    if writer.caps()?.read_only {
        return Err(OpError::ReadOnly);
    }
    Ok(writer)
}

/// Bytes per buffer of a transfer, and per body piece handed to actix: each
/// piece is one socket write, and 512 KiB writes cost less CPU than 64 KiB
/// ones. The backend reads a chunk as several NBD requests (see
/// `backend::nbd::PIPELINE_REQUEST`) and writes it as one.
pub const CHUNK: usize = 512 * 1024;
/// NBD requests in flight per transfer (2 MiB of reads, 4 MiB of writes):
/// hides qemu-nbd's per-request latency (it serves the requests of one
/// connection concurrently).
const WINDOW: usize = 8;
/// Chunks read ahead of the client (beyond those in flight).
const DEPTH: usize = 2;

/// Logs the start of an operation and, when dropped, its end with the bytes
/// moved and the duration (`image_server.py`'s `… start` / `… end` lines).
pub struct OpLog {
    op: &'static str,
    id: String,
    started: Instant,
    pub bytes: u64,
    /// For a write: the body bytes read straight from the stream.
    pub direct: Option<u64>,
}

impl OpLog {
    pub fn start(op: &'static str, id: &str, detail: std::fmt::Arguments<'_>) -> OpLog {
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
struct Lent {
    buf: Vec<u8>,
    len: usize,
    home: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Lent {
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

    /// An empty buffer with room for `size` bytes.
    fn get_empty(&self) -> Vec<u8> {
        let mut v = self.free.lock().pop().unwrap_or_default();
        v.clear();
        v.reserve_exact(self.size);
        v
    }

    fn lend(&self, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            len,
            home: self.free.clone(),
        })
    }
}

/// The body of a GET: chunks from its reader, plus whatever must live as
/// long as the response (the request's lease, reader slot, log line). The
/// request counts as served once its last byte is handed on; a body dropped
/// earlier (backend error, client gone) counts as failed. The reader drops
/// the lease and guard early when the client stops reading (see
/// `read_stream`).
pub struct ReadBody<G> {
    rx: mpsc::Receiver<Result<Bytes, BackendError>>,
    /// The first chunk, taken early by [`ReadBody::first_chunk`].
    first: Option<Bytes>,
    log: OpLog,
    /// For the byte counters (atomics; no lock per chunk).
    transfer: Arc<Transfer>,
    /// Bytes promised and not yet delivered.
    remaining: u64,
    held: Held<G>,
}

/// The lease and guard of a GET, shared with its reader.
type Held<G> = Arc<Mutex<Option<(Lease, G)>>>;

impl<G> ReadBody<G> {
    /// Waits until the reader has the first chunk (or ended), so that a
    /// backend that fails or times out before any byte was read is a JSON
    /// error (its status from the error) instead of a response head
    /// followed by a truncated body. The chunk stays first in the body.
    pub async fn first_chunk(&mut self) -> Result<(), OpError> {
        if self.remaining == 0 || self.first.is_some() {
            return Ok(());
        }
        match self.rx.recv().await {
            Some(Ok(b)) => {
                self.first = Some(b);
                Ok(())
            }
            Some(Err(e)) => Err(e.into()),
            // The reader stopped without a word (it only does so once the
            // body is gone): nothing to send.
            None => Err(BackendError::Io("the reader stopped".into()).into()),
        }
    }
}

impl<G> Stream for ReadBody<G> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let next = match this.first.take() {
            Some(b) => Some(Ok(b)),
            None => ready!(this.rx.poll_recv(cx)),
        };
        match next {
            Some(Err(e)) => Poll::Ready(Some(Err(io::Error::other(e.to_string())))),
            Some(Ok(b)) => {
                let n = b.len() as u64;
                this.log.bytes += n;
                this.transfer.stats().add_read(n);
                this.remaining = this.remaining.saturating_sub(n);
                if this.remaining == 0 {
                    if let Some((lease, _)) = this.held.lock().as_mut() {
                        lease.served();
                    }
                }
                Poll::Ready(Some(Ok(b)))
            }
            // Ending short of the promised length is an error, so the
            // connection is closed, never reused mid-body.
            None if this.remaining > 0 => {
                this.remaining = 0;
                Poll::Ready(Some(Err(io::Error::other("response body ended early"))))
            }
            None => Poll::Ready(None),
        }
    }
}

/// Streams `len` bytes from `start` of `handle`, read `DEPTH` chunks ahead
/// of the client by a reader of its own: a task on this worker for NBD, a
/// blocking thread for a file. The reader keeps going while the client
/// socket is full, so the backend is not left waiting each time the client
/// side stalls. A backend error ends the stream with an error, so the client
/// sees a truncated body (the length was promised in the headers), never a
/// clean short one. A client that takes no data for `stall_timeout` is
/// given up on: the reader stops, the backend and `guard` (slot, lease) are
/// released, and its body ends in an error. Must be called on the worker's
/// runtime.
pub fn read_stream<G: Send + 'static>(
    handle: Handle,
    start: u64,
    len: u64,
    log: OpLog,
    mut lease: Lease,
    guard: G,
    stall_timeout: Duration,
) -> ReadBody<G> {
    if len == 0 {
        lease.served();
    }
    let (tx, rx) = mpsc::channel(DEPTH);
    let out = Sender {
        tx,
        id: log.id.clone(),
        stall_timeout,
    };
    let transfer = lease.transfer().clone();
    let held: Held<G> = Arc::new(Mutex::new(Some((lease, guard))));
    match handle {
        Handle::Nbd(h) => {
            actix_web::rt::spawn(read_nbd(h, start, len, out, held.clone()));
        }
        handle @ Handle::File(_) => read_in_thread(handle, start, len, out, held.clone()),
    }
    ReadBody {
        rx,
        first: None,
        log,
        transfer,
        remaining: len,
        held,
    }
}

/// Where a GET reader sends its chunks.
struct Sender {
    tx: mpsc::Sender<Result<Bytes, BackendError>>,
    id: String,
    stall_timeout: Duration,
}

impl Sender {
    /// Sends a chunk read at `offset`; false when the reader must stop: the
    /// client is gone, or took nothing for `stall_timeout` (then the lease
    /// and guard in `held` are released now, not when actix gives up).
    async fn send<G>(&self, chunk: Bytes, offset: u64, held: &Held<G>) -> bool {
        match tokio::time::timeout(self.stall_timeout, self.tx.send(Ok(chunk))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                log::info!("GET client disconnected image_id={} at={offset}", self.id);
                false
            }
            Err(_) => {
                self.stalled(offset, held);
                false
            }
        }
    }

    /// The client took nothing for `stall_timeout`: releases the lease and
    /// guard now, not when actix gives up.
    fn stalled<G>(&self, offset: u64, held: &Held<G>) {
        log::warn!(
            "GET client stopped reading image_id={} at={offset}: released after {}s",
            self.id,
            self.stall_timeout.as_secs()
        );
        drop(held.lock().take());
    }

    /// Ends the body with `e`, read at `offset`; waits for the client at
    /// most `stall_timeout`, like [`Sender::send`]. A timeout was logged by
    /// the backend already.
    async fn fail<G>(&self, offset: u64, e: BackendError, held: &Held<G>) {
        if !matches!(e, BackendError::Timeout(_)) {
            log::error!("GET error image_id={} offset={offset} err={e}", self.id);
        }
        if tokio::time::timeout(self.stall_timeout, self.tx.send(Err(e)))
            .await
            .is_err()
        {
            self.stalled(offset, held);
        }
    }
}

/// Reads an NBD export with up to `WINDOW` requests in flight, sending the
/// chunks in order; stops when the body is dropped or stalls.
async fn read_nbd<G>(handle: NbdHandle, start: u64, len: u64, out: Sender, held: Held<G>) {
    let mut handle = match handle.into_queue() {
        Ok(q) => q,
        Err(e) => return out.fail(start, e, &held).await,
    };
    let size = CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX)).max(1);
    let buffers = Buffers::new(size);
    let end = start + len;
    let mut next = start;
    let mut sent = start;
    let result: Result<(), BackendError> = async {
        loop {
            while handle.queued() < WINDOW && next < end {
                let n = (end - next).min(size as u64) as usize;
                handle.start_read(buffers.get(), n, next)?;
                next += n as u64;
            }
            if handle.queued() == 0 {
                return Ok(());
            }
            // A chunk is read as several requests; the last one gives it back.
            let (buf, n) = loop {
                if let Retired::Read(buf, n) = poll_fn(|cx| handle.poll_oldest(cx)).await? {
                    break (buf, n);
                }
            };
            if !out.send(buffers.lend(buf, n), sent, &held).await {
                handle.discard();
                return Ok(());
            }
            sent += n as u64;
        }
    }
    .await;
    if let Err(e) = result {
        handle.discard();
        out.fail(sent, e, &held).await;
    }
}

/// Reads a file on a blocking thread, sending the chunks in order.
fn read_in_thread<G: Send + 'static>(
    mut handle: Handle,
    start: u64,
    len: u64,
    out: Sender,
    held: Held<G>,
) {
    let rt = tokio::runtime::Handle::current();
    spawn_blocking(move || {
        let buffers = Buffers::new(CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX)));
        let end = start + len;
        let mut off = start;
        while off < end {
            let n = (end - off).min(buffers.size as u64) as usize;
            let mut buf = buffers.get();
            if let Err(e) = handle.read_at(&mut buf[..n], off) {
                handle.discard();
                rt.block_on(out.fail(off, e, &held));
                return;
            }
            if !rt.block_on(out.send(buffers.lend(buf, n), off, &held)) {
                return;
            }
            off += n as u64;
        }
    });
}

/// Granularity of zero detection in uploads: qcow2's default cluster size,
/// so a zero run leaves whole clusters unallocated.
const ZERO_BLOCK: u64 = 64 * 1024;

/// Splits `data`, to be written at image offset `offset`, into maximal runs
/// of whole `ZERO_BLOCK`s (aligned to the image) that are all zero or not:
/// `(range in data, all zero)`, in order, covering `data`.
fn zero_runs(data: &[u8], offset: u64) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let block_end = (offset + pos as u64) / ZERO_BLOCK * ZERO_BLOCK + ZERO_BLOCK;
        let end = data.len().min((block_end - offset) as usize);
        let zero = is_zero(&data[pos..end]);
        match runs.last_mut() {
            Some((r, z)) if *z == zero => r.end = end,
            _ => runs.push((pos..end, zero)),
        }
        pos = end;
    }
    runs
}

/// Bytes a write completed so far, counted in the transfer's stats too.
struct Written {
    bytes: u64,
    stats: Arc<TransferStats>,
}

impl Written {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        self.stats.add_written(n);
    }

    /// Counts what a retired request wrote or zeroed.
    fn retired(&mut self, r: Retired) {
        if let Retired::Done(n) = r {
            self.add(n);
        }
    }
}

/// Why a write stopped.
enum Failure {
    /// The client: the body stalled or ended early.
    Client(OpError),
    Backend(BackendError),
}

/// Bodies at least this long are read around actix (see [`Direct`]).
const DIRECT_MIN: u64 = 1024 * 1024;
/// How long a probe may stay unanswered before the body is left to actix:
/// only a change in actix-http would make it (see `direct_body`), or a
/// client that stops sending right after the head.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// How the rest of a body is read.
enum Direct {
    /// Through actix's payload only.
    Never,
    /// Through the payload; the connection's stream can be asked for the
    /// rest once the body is long enough.
    Possible(Inbox),
    /// Asked: through the payload until the piece that ends at the probe.
    Probing(Inbox),
    /// Straight from the stream into the chunk the inbox holds; the
    /// payload brings only placeholders (counted, not copied).
    Reading(Inbox),
}

/// The request body as `CHUNK`-sized chunks (the last one shorter).
///
/// A body goes through actix-http's payload in pieces of at most 128 KiB
/// (its read size), each a view of actix's read buffer that is copied here
/// into the chunk being filled. A body of at least `DIRECT_MIN` is read
/// around that: once the [`Inbox`] shows that every body byte actix read is
/// here, the rest is read from the stream straight into the chunk, in reads
/// as large as the chunk's room (see `direct_body`). Chunk boundaries stay
/// where they would be either way.
///
/// Each piece is copied and dropped before anything awaits: only once no
/// view is left can actix reuse its read buffer whole and read the next
/// 128 KiB in one call. A piece kept alive (even an empty slice of it)
/// makes actix start a fresh 8 KiB buffer and read in 8-64 KiB steps: five
/// times the receive calls, each of which can send a window update that
/// wakes the client (measured: 44k receive calls per 1.5 GiB upload against
/// 26k, and less server CPU).
struct BodyChunks<'a> {
    payload: &'a mut Payload,
    length: u64,
    /// Body bytes taken from the payload so far (placeholders included).
    received: u64,
    timeout: Duration,
    /// Chunks filled and not yet returned (at most the few one piece ends).
    ready: std::collections::VecDeque<Bytes>,
    filling: Vec<u8>,
    /// Size of the chunk being filled (0: none started).
    want: usize,
    /// Body bytes in chunks so far (copied or read directly).
    copied: u64,
    buffers: Buffers,
    direct: Direct,
    /// How full the chunk was when it was given to the inbox.
    given: usize,
    /// Body bytes read straight from the stream.
    direct_bytes: u64,
}

impl<'a> BodyChunks<'a> {
    fn new(body: Body<'a>) -> BodyChunks<'a> {
        let length = body.length;
        BodyChunks {
            payload: body.payload,
            length,
            received: 0,
            timeout: body.timeout,
            ready: std::collections::VecDeque::new(),
            filling: Vec::new(),
            want: 0,
            copied: 0,
            buffers: Buffers::new(CHUNK.min(usize::try_from(length).unwrap_or(usize::MAX))),
            direct: body.direct.map_or(Direct::Never, Direct::Possible),
            given: 0,
            direct_bytes: 0,
        }
    }

    /// Starts a chunk if none is being filled.
    fn start_chunk(&mut self) {
        if self.want == 0 {
            let left = self.length - self.copied;
            self.want = self.buffers.size.min(left as usize);
            self.filling = self.buffers.get_empty();
        }
    }

    /// Queues the chunk being filled (full).
    fn finish_chunk(&mut self, full: Vec<u8>) {
        self.want = 0;
        let len = full.len();
        self.ready.push_back(self.buffers.lend(full, len));
    }

    /// Copies all of `piece` into chunks, queueing the ones it completes.
    fn absorb(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            self.start_chunk();
            let n = (self.want - self.filling.len()).min(piece.len());
            self.filling.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            self.copied += n as u64;
            if self.filling.len() == self.want {
                let full = std::mem::take(&mut self.filling);
                self.finish_chunk(full);
            }
        }
    }

    /// Asks the stream for the rest of a long body, once.
    fn arm(&mut self) {
        if let Direct::Possible(inbox) = &self.direct {
            if self.length - self.received >= DIRECT_MIN {
                let inbox = inbox.clone();
                self.direct = if inbox.arm() {
                    Direct::Probing(inbox)
                } else {
                    Direct::Never
                };
            }
        }
    }

    /// The piece that ended at the probe was taken: the rest of the body
    /// is the next bytes of the stream.
    fn start_reading(&mut self, inbox: Inbox) {
        let budget = self.length - self.received;
        if budget == 0 {
            inbox.release();
            self.direct = Direct::Never;
            return;
        }
        self.start_chunk();
        self.given = self.filling.len();
        inbox.start(std::mem::take(&mut self.filling), self.want, budget);
        self.direct = Direct::Reading(inbox);
    }

    /// Queues the inbox's chunk once full, and gives it the next.
    fn take_direct(&mut self) {
        let Direct::Reading(inbox) = &self.direct else {
            return;
        };
        let Some(full) = inbox.take_full() else {
            return;
        };
        let inbox = inbox.clone();
        let n = (full.len() - self.given) as u64;
        self.direct_bytes += n;
        self.copied += n;
        self.finish_chunk(full);
        if self.copied < self.length {
            self.start_chunk();
            self.given = 0;
            inbox.give(std::mem::take(&mut self.filling), self.want);
        }
    }

    /// Body bytes that arrived so far: taken from actix or read directly
    /// (not placeholders, which actix may drop when the stream ends).
    fn arrived(&self) -> u64 {
        match &self.direct {
            Direct::Reading(inbox) => {
                self.copied + inbox.filled().map_or(0, |n| (n - self.given) as u64)
            }
            _ => self.received,
        }
    }

    /// Leaves the rest of the body to actix.
    fn stop_direct(&mut self) {
        if let Direct::Probing(inbox) | Direct::Reading(inbox) =
            std::mem::replace(&mut self.direct, Direct::Never)
        {
            inbox.release();
        }
    }

    /// The next chunk, `None` once `length` bytes were returned. Waits at
    /// most `timeout` for each piece of the body. Cancel-safe: all progress
    /// is kept in `self`.
    async fn next(&mut self) -> Result<Option<Bytes>, OpError> {
        loop {
            self.take_direct();
            if let Some(chunk) = self.ready.pop_front() {
                return Ok(Some(chunk));
            }
            if self.received == self.length {
                self.stop_direct();
                return Ok(None);
            }
            self.arm();
            let probing = matches!(self.direct, Direct::Probing(_));
            let wait = if probing {
                self.timeout.min(PROBE_WAIT)
            } else {
                self.timeout
            };
            let piece = match tokio::time::timeout(wait, self.payload.next()).await {
                Err(_) if probing && wait < self.timeout => {
                    log::info!("request body left to actix: probe unanswered");
                    self.stop_direct();
                    continue;
                }
                Err(_) => {
                    return Err(OpError::BodyTimeout {
                        received: self.arrived(),
                    })
                }
                Ok(Some(Ok(piece))) => piece,
                Ok(end) => {
                    if let Some(Err(e)) = end {
                        log::info!("request body error after {} bytes: {e}", self.arrived());
                    }
                    return Err(OpError::BodyEnded {
                        received: self.arrived(),
                    });
                }
            };
            let take = piece.len().min((self.length - self.received) as usize);
            self.received += take as u64;
            match &self.direct {
                // Placeholders for bytes already in the inbox's chunk.
                Direct::Reading(_) => {}
                Direct::Probing(inbox) => {
                    let inbox = inbox.clone();
                    self.absorb(&piece[..take]);
                    if inbox.is_probe_end(piece.as_ptr_range().end as usize) {
                        self.start_reading(inbox);
                    }
                }
                Direct::Never | Direct::Possible(_) => self.absorb(&piece[..take]),
            }
            // `piece` is dropped here, before the next await.
        }
    }
}

impl Drop for BodyChunks<'_> {
    fn drop(&mut self) {
        self.stop_direct();
    }
}

/// The body of a write request: `length` bytes, with at most `timeout`
/// between its pieces. `direct`: the connection's [`Inbox`], when the body
/// is framed by its Content-Length alone (so that the rest of it can be
/// read around actix).
pub struct Body<'a> {
    pub payload: &'a mut Payload,
    pub length: u64,
    pub timeout: Duration,
    pub direct: Option<Inbox>,
}

/// Writes exactly `length` bytes of the request body to `writer` at
/// `offset` (0 for a replacing writer), then flushes when asked. The body is
/// read with at most `timeout` between pieces; a body that ends early or
/// stalls is an error, and nothing is committed for a replacing writer.
/// All-zero runs become zero requests where the backend can zero (the
/// export keeps them sparse). Returns the bytes written. Returns only once
/// no write of this request is in flight, so the caller's locks cover
/// every write. Bytes are added to the transfer's stats as the backend
/// completes them.
pub async fn write(
    body: Body<'_>,
    writer: Writer,
    offset: u64,
    flush: bool,
    log: &mut OpLog,
    t: &Arc<Transfer>,
) -> Result<u64, OpError> {
    if matches!(writer, Writer::Replace(_)) && offset != 0 {
        return Err(OpError::NotSupported(
            "ranged writes are not supported by the file backend",
        ));
    }
    let mut body = BodyChunks::new(body);
    let mut written = Written {
        bytes: 0,
        stats: t.stats().clone(),
    };
    let result = match writer {
        Writer::At(h) => match h.caps() {
            Ok(caps) => write_nbd(&mut body, h, offset, caps.can_zero, flush, &mut written).await,
            Err(e) => Err(Failure::Backend(e)),
        },
        Writer::Replace(u) => write_file(&mut body, u, flush, &mut written).await,
    };
    log.bytes = written.bytes;
    log.direct = Some(body.direct_bytes);
    match result {
        Ok(()) => Ok(written.bytes),
        Err(Failure::Client(e)) => Err(e),
        Err(Failure::Backend(e)) => {
            // A timeout was logged by the backend already.
            if !matches!(e, BackendError::Timeout(_)) {
                log::error!("write error image_id={} err={e}", log.id);
            }
            Err(e.into())
        }
    }
}

/// Makes `size` bytes at `offset` read as zeroes (clamped to the end of the
/// image), then flushes when asked. Returns the bytes zeroed, also counted
/// in the transfer's stats.
pub async fn zero(
    t: &Arc<Transfer>,
    offset: u64,
    size: u64,
    flush: bool,
    log: &mut OpLog,
) -> Result<u64, OpError> {
    let mut h = open(t).await?;
    let zeroed = blocking(move || {
        let image_size = h.size();
        if h.caps()?.read_only {
            return Err(OpError::ReadOnly);
        }
        if offset >= image_size {
            return Err(OpError::OffsetPastEnd);
        }
        let n = size.min(image_size - offset);
        let r = h
            .zero(offset, n)
            .and_then(|_| if flush { h.flush() } else { Ok(()) });
        r.map(|_| n).map_err(|e| {
            log::error!("PATCH zero error err={e}");
            OpError::from(e)
        })
    })
    .await?;
    log.bytes = zeroed;
    t.stats().add_zeroed(zeroed);
    Ok(zeroed)
}

/// A transfer's extents (see [`extents`]).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ExtentList {
    Allocation(Vec<Extent>),
    Dirty(Vec<DirtyExtent>),
}

/// The allocation extents of the whole image, or with `dirty` those merged
/// with the configured dirty bitmap (every extent dirty when there is none
/// or the export does not offer it).
pub async fn extents(t: &Arc<Transfer>, dirty: bool) -> Result<ExtentList, OpError> {
    let mut h = open(t).await?;
    blocking(move || {
        if !dirty {
            return Ok(ExtentList::Allocation(h.allocation_extents()?));
        }
        Ok(ExtentList::Dirty(match h.dirty_extents()? {
            Some(list) => list,
            None => extents::all_dirty(&h.allocation_extents()?),
        }))
    })
    .await
}

/// The checksum of the whole image (see [`checksum`]).
pub async fn checksum(
    t: &Arc<Transfer>,
    params: checksum::Params,
    log: &mut OpLog,
) -> Result<checksum::Checksum, OpError> {
    let mut h = open(t).await?;
    let size = h.size();
    let id = t.id().to_string();
    let sum = blocking(move || {
        checksum::compute(&mut h, &params).map_err(|e| {
            log::error!("CHECKSUM error image_id={id} err={e}");
            OpError::from(e)
        })
    })
    .await?;
    log.bytes = size;
    Ok(sum)
}

/// Flushes what was written to the transfer's storage (fsync for a file).
pub async fn flush(t: &Arc<Transfer>) -> Result<(), OpError> {
    let mut h = open(t).await?;
    blocking(move || {
        h.flush().map_err(|e| {
            log::error!("FLUSH error err={e}");
            OpError::from(e)
        })
    })
    .await
}

/// Writes the body to an NBD export with up to `WINDOW` requests in flight
/// (to disjoint ranges, so their order does not matter), keeping them moving
/// while the next chunk arrives. On failure, waits for what is in flight.
async fn write_nbd(
    body: &mut BodyChunks<'_>,
    handle: NbdHandle,
    offset: u64,
    zero_ok: bool,
    flush: bool,
    written: &mut Written,
) -> Result<(), Failure> {
    let mut handle = handle.into_queue().map_err(Failure::Backend)?;
    let r = pump_nbd(body, &mut handle, offset, zero_ok, flush, written).await;
    if r.is_err() {
        handle.discard();
        while handle.queued() > 0 {
            match poll_fn(|cx| handle.poll_oldest(cx)).await {
                Ok(done) => written.retired(done),
                Err(_) => break,
            }
        }
    }
    r
}

async fn pump_nbd(
    body: &mut BodyChunks<'_>,
    handle: &mut NbdQueue,
    mut offset: u64,
    zero_ok: bool,
    flush: bool,
    written: &mut Written,
) -> Result<(), Failure> {
    loop {
        let next = if handle.queued() > 0 {
            tokio::select! {
                biased;
                done = poll_fn(|cx| handle.poll_oldest(cx)) => {
                    written.retired(done.map_err(Failure::Backend)?);
                    continue;
                }
                next = body.next() => next,
            }
        } else {
            body.next().await
        };
        let Some(chunk) = next.map_err(Failure::Client)? else {
            break;
        };
        // A full window is drained completely before the next chunk goes
        // out: the worker then alternates between receiving a window's worth
        // of body and handing it to qemu-nbd, which costs both of them less
        // CPU than keeping the window topped up one request at a time
        // (measured: server 0.67 -> 0.56 s, qemu-nbd 0.74 -> 0.70 s per
        // 1.5 GiB upload; the client keeps sending into the socket buffer
        // meanwhile).
        if handle.queued() >= WINDOW {
            while handle.queued() > 0 {
                let done = poll_fn(|cx| handle.poll_oldest(cx)).await;
                written.retired(done.map_err(Failure::Backend)?);
            }
        }
        let len = chunk.len() as u64;
        if zero_ok {
            // Zero runs become WRITE_ZEROES, data runs writes of slices of
            // the chunk (no copy).
            for (run, zero) in zero_runs(&chunk, offset) {
                let at = offset + run.start as u64;
                let started = if zero {
                    handle.start_zero(at, run.len() as u64)
                } else {
                    handle.start_write(chunk.slice(run), at)
                };
                started.map_err(Failure::Backend)?;
            }
        } else {
            handle
                .start_write(chunk, offset)
                .map_err(Failure::Backend)?;
        }
        offset += len;
    }
    // A flush covers only writes that completed before it was sent.
    while handle.queued() > 0 {
        let done = poll_fn(|cx| handle.poll_oldest(cx)).await;
        written.retired(done.map_err(Failure::Backend)?);
    }
    if flush {
        handle.start_flush().map_err(Failure::Backend)?;
        poll_fn(|cx| handle.poll_oldest(cx))
            .await
            .map_err(Failure::Backend)?;
        handle.flushed();
    }
    Ok(())
}

/// Writes the body to a new file on a blocking thread, committing it only
/// when every byte arrived.
async fn write_file(
    body: &mut BodyChunks<'_>,
    upload: FileUpload,
    flush: bool,
    written: &mut Written,
) -> Result<(), Failure> {
    let (tx, mut rx) = mpsc::channel::<Option<Bytes>>(DEPTH);
    let stats = written.stats.clone();
    let writer = spawn_blocking(move || {
        let mut upload = upload;
        let mut written = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(Some(b)) => {
                    if let Err(e) = upload.write(&b) {
                        return (written, Err(e));
                    }
                    written += b.len() as u64;
                    stats.add_written(b.len() as u64);
                }
                // Every byte arrived.
                Some(None) => return (written, upload.commit(flush).map(|_| ())),
                // The body failed: the upload is dropped, the target unchanged.
                None => return (written, Err(BackendError::Io("upload aborted".into()))),
            }
        }
    });
    let mut client_error = None;
    loop {
        match body.next().await {
            Ok(Some(chunk)) => {
                if tx.send(Some(chunk)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = tx.send(None).await;
                break;
            }
            Err(e) => {
                client_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let (n, result) = writer
        .await
        .unwrap_or_else(|_| (0, Err(BackendError::Io("writer thread panicked".into()))));
    written.bytes = n;
    match client_error {
        Some(e) => Err(Failure::Client(e)),
        None => result.map_err(Failure::Backend),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_follow_image_aligned_blocks() {
        let b = ZERO_BLOCK as usize;
        let mut data = vec![0u8; 4 * b];
        assert_eq!(zero_runs(&data, 0), vec![(0..4 * b, true)]);
        assert_eq!(zero_runs(&[], 0), vec![]);
        // One byte of data makes its whole block data.
        data[b + 7] = 1;
        assert_eq!(
            zero_runs(&data, 0),
            vec![(0..b, true), (b..2 * b, false), (2 * b..4 * b, true)]
        );
        // Blocks are aligned to the image, not to the data: written at
        // offset 100, the first block is the first b - 100 bytes.
        assert_eq!(
            zero_runs(&data, 100),
            vec![
                (0..b - 100, true),
                (b - 100..2 * b - 100, false),
                (2 * b - 100..4 * b, true)
            ]
        );
        // Adjacent data blocks merge into one run; a short tail is a run.
        data[2 * b] = 1;
        data[4 * b - 1] = 1;
        assert_eq!(
            zero_runs(&data[..4 * b - 10], 0),
            vec![(0..b, true), (b..3 * b, false), (3 * b..4 * b - 10, true)]
        );
        assert_eq!(zero_runs(&data, 0), vec![(0..b, true), (b..4 * b, false)]);
    }
}
