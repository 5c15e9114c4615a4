//! The GET stream: a range of the image read `DEPTH` chunks ahead of the
//! client by a reader of its own (a task on the worker for NBD, a blocking
//! thread for a file) and handed to actix as a [`ReadBody`].

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_web::rt::task::spawn_blocking;
use bytes::Bytes;
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{retire_all, Buffers, OpError, OpLog, CHUNK, DEPTH, WINDOW};
use crate::backend::file::FileHandle;
use crate::backend::nbd_export::{ExportConn, Retired};
use crate::backend::{BackendError, Opened};
use crate::direct_body::Abort;
use crate::transfers::{Lease, Transfer};

/// The body of a GET: chunks from its reader, plus whatever must live as
/// long as the response (the request's lease, reader slot, log line). The
/// request counts as served once its last byte is handed on; a body dropped
/// earlier (backend error, client gone) counts as failed. The reader drops
/// the lease and guard itself when it stops early (see `read_stream`).
pub(crate) struct ReadBody<G> {
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
    pub(crate) async fn first_chunk(&mut self) -> Result<(), OpError> {
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
/// clean short one. A client that takes no data for the stall timeout is
/// given up on (see [`Stalled`]): its connection is closed, and the reader
/// stops. A reader that stops early (the client gone or stalled, a backend
/// error nobody took) releases the backend, then `guard` (slot) and the
/// lease, once the reads it had in flight have retired. Must be called on
/// the worker's runtime.
pub(crate) fn read_stream<G: Send + 'static>(
    handle: Opened,
    start: u64,
    len: u64,
    log: OpLog,
    mut lease: Lease,
    guard: G,
    stalled: Stalled,
) -> ReadBody<G> {
    if len == 0 {
        lease.served();
    }
    let (tx, rx) = mpsc::channel(DEPTH);
    let out = Sender {
        tx,
        id: log.id.clone(),
        stalled,
    };
    let transfer = lease.transfer().clone();
    let held: Held<G> = Arc::new(Mutex::new(Some((lease, guard))));
    match handle {
        Opened::Nbd(h) => {
            actix_web::rt::spawn(read_nbd(h, start, len, out, held.clone()));
        }
        Opened::File(h) => read_in_thread(h, start, len, out, held.clone()),
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

/// When a GET's client counts as gone though still connected, and what
/// then ends its connection.
pub(crate) struct Stalled {
    /// The client took no data for this long.
    pub timeout: Duration,
    /// The connection to close then (with every buffer it holds: actix's,
    /// the socket's, a chunk half written); `None` on a connection that
    /// cannot be aborted, where only the request's own resources go.
    pub connection: Option<Abort>,
}

/// Where a GET reader sends its chunks.
struct Sender {
    tx: mpsc::Sender<Result<Bytes, BackendError>>,
    id: String,
    stalled: Stalled,
}

impl Sender {
    /// Sends a chunk read at `offset`; false when the reader must stop: the
    /// client is gone, or took nothing for the stall timeout (then its
    /// connection is closed).
    async fn send(&self, chunk: Bytes, offset: u64) -> bool {
        match tokio::time::timeout(self.stalled.timeout, self.tx.send(Ok(chunk))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                log::info!("GET client disconnected image_id={} at={offset}", self.id);
                false
            }
            Err(_) => {
                self.stalled(offset);
                false
            }
        }
    }

    /// The client took nothing for the stall timeout: closes its
    /// connection.
    fn stalled(&self, offset: u64) {
        let secs = self.stalled.timeout.as_secs();
        log::warn!(
            "GET client stopped reading image_id={} at={offset}: connection closed after {secs}s",
            self.id,
        );
        if let Some(c) = &self.stalled.connection {
            c.abort(format!("the client took no data for {secs} s"));
        }
    }

    /// Ends the body with `e`, read at `offset`; waits for the client at
    /// most the stall timeout, like [`Sender::send`] (false then). A
    /// timeout was logged by the backend already.
    async fn fail(&self, offset: u64, e: BackendError) -> bool {
        if !matches!(e, BackendError::Timeout(_)) {
            log::error!("GET error image_id={} offset={offset} err={e}", self.id);
        }
        let sent = tokio::time::timeout(self.stalled.timeout, self.tx.send(Err(e))).await;
        if sent.is_err() {
            self.stalled(offset);
        }
        sent.is_ok()
    }
}

/// Gives back the lease and guard of a GET whose reader stopped early (its
/// body may live on a little, until actix drops it).
fn release<G>(held: &Held<G>) {
    drop(held.lock().take());
}

/// Reads an NBD export with up to `WINDOW` requests in flight, sending the
/// chunks in order. Stops when the body is dropped or stalls, once the
/// reads in flight have retired.
async fn read_nbd<G>(mut handle: ExportConn, start: u64, len: u64, out: Sender, held: Held<G>) {
    let size = CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX)).max(1);
    let buffers = Buffers::new(size);
    let end = start + len;
    let mut next = start;
    let mut sent = start;
    // Whether every chunk was handed on.
    let result: Result<bool, BackendError> = async {
        loop {
            while handle.queued() < WINDOW && next < end {
                let n = (end - next).min(size as u64) as usize;
                handle.start_read(buffers.get(), n, next)?;
                next += n as u64;
            }
            if handle.queued() == 0 {
                return Ok(true);
            }
            // A chunk is read as several requests; the last one gives it back.
            let (buf, n) = loop {
                if let Retired::Read(buf, n) = poll_fn(|cx| handle.poll_oldest(cx)).await? {
                    break (buf, n);
                }
            };
            if !out.send(buffers.lend(buf, n), sent).await {
                return Ok(false);
            }
            sent += n as u64;
        }
    }
    .await;
    if matches!(result, Ok(true)) {
        return;
    }
    handle.discard();
    retire_all(&mut handle, |_| ()).await;
    let delivered = match result {
        Err(e) => out.fail(sent, e).await,
        Ok(_) => false,
    };
    // A delivered error ends the body, which then ends the request.
    if !delivered {
        release(&held);
    }
}

/// Reads a file on a blocking thread, sending the chunks in order.
fn read_in_thread<G: Send + 'static>(
    handle: FileHandle,
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
                if !rt.block_on(out.fail(off, e)) {
                    release(&held);
                }
                return;
            }
            if !rt.block_on(out.send(buffers.lend(buf, n), off)) {
                // No read is in flight on a file.
                return release(&held);
            }
            off += n as u64;
        }
    });
}
