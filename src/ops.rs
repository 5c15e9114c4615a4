//! Operations that move bytes between an HTTP body and a backend. They run
//! the blocking backend work on the blocking thread pool and keep memory per
//! request bounded: a few fixed-size buffers whatever the image size.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::rt::task::spawn_blocking;
use actix_web::web::Payload;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::backend::file::FileUpload;
use crate::backend::{BackendError, Handle, Lease};
use crate::http::error::ApiError;
use crate::stats::TransferStats;

/// Bytes moved per backend call (and per HTTP body chunk).
pub const CHUNK: usize = 2 * 1024 * 1024;
/// Chunks buffered between the backend thread and the HTTP side.
const DEPTH: usize = 2;

/// Logs the start of an operation and, when dropped, its end with the bytes
/// moved and the duration (the seed's `… start` / `… end` lines).
pub struct OpLog {
    op: &'static str,
    id: String,
    started: Instant,
    pub bytes: u64,
}

impl OpLog {
    pub fn start(op: &'static str, id: &str, detail: std::fmt::Arguments<'_>) -> OpLog {
        log::info!("{op} start image_id={id} {detail}");
        OpLog {
            op,
            id: id.to_string(),
            started: Instant::now(),
            bytes: 0,
        }
    }
}

impl Drop for OpLog {
    fn drop(&mut self) {
        log::info!(
            "{} end image_id={} bytes={} duration_s={:.3}",
            self.op,
            self.id,
            self.bytes,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A buffer lent to the HTTP side as `Bytes`; dropped, it goes back to the
/// reader thread for reuse.
struct Lent {
    buf: Vec<u8>,
    len: usize,
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

/// The body of a GET: chunks read by a blocking thread, plus whatever must
/// live exactly as long as the response (the request's lease, reader slot,
/// log line). The request counts as served once its last byte is handed on;
/// a body dropped earlier (backend error, client gone) counts as failed.
pub struct ReadBody<G> {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    log: OpLog,
    lease: Lease,
    remaining: u64,
    _guard: G,
}

impl<G: Unpin> Stream for ReadBody<G> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                let n = b.len() as u64;
                this.log.bytes += n;
                this.lease.stats().add_read(n);
                this.remaining = this.remaining.saturating_sub(n);
                if this.remaining == 0 {
                    this.lease.served();
                }
                Poll::Ready(Some(Ok(b)))
            }
            other => other,
        }
    }
}

/// Streams `len` bytes from `start` of `handle`. A backend error ends the
/// stream with an error, so the client sees a truncated body (the length was
/// promised in the headers), never a clean short one.
pub fn read_stream<G: Unpin>(
    mut handle: Handle,
    start: u64,
    len: u64,
    log: OpLog,
    mut lease: Lease,
    guard: G,
) -> ReadBody<G> {
    if len == 0 {
        lease.served();
    }
    let (tx, rx) = mpsc::channel(DEPTH);
    let id = log.id.clone();
    spawn_blocking(move || {
        let (home, free) = std::sync::mpsc::channel::<Vec<u8>>();
        let end = start + len;
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            let mut buf = free.try_recv().unwrap_or_else(|_| vec![0; CHUNK]);
            if let Err(e) = handle.read_at(&mut buf[..n], off) {
                log::error!("GET error image_id={id} offset={off} err={e}");
                handle.discard();
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                return;
            }
            let chunk = Bytes::from_owner(Lent {
                buf,
                len: n,
                home: home.clone(),
            });
            if tx.blocking_send(Ok(chunk)).is_err() {
                log::info!("GET client disconnected image_id={id} at={off}");
                return;
            }
            off += n as u64;
        }
    });
    ReadBody {
        rx,
        log,
        lease,
        remaining: len,
        _guard: guard,
    }
}

/// Where the bytes of a write go.
pub enum Sink {
    /// Into an open backend at `offset`; all-zero chunks become zero
    /// requests when `zero_ok` (the export keeps them sparse).
    Handle {
        handle: Handle,
        offset: u64,
        zero_ok: bool,
    },
    /// A new file replacing the configured one.
    Upload(FileUpload),
}

enum Msg {
    Data(Bytes),
    Finish,
}

/// True when every byte is zero. ORs 4 KiB blocks (which vectorises) and
/// stops at the first block with data.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        match self {
            Sink::Handle {
                handle,
                offset,
                zero_ok,
            } => {
                if *zero_ok && is_zero(data) {
                    handle.zero(*offset, data.len() as u64)?;
                } else {
                    handle.write_at(data, *offset)?;
                }
                *offset += data.len() as u64;
                Ok(())
            }
            Sink::Upload(u) => u.write(data),
        }
    }

    fn finish(self, flush: bool) -> Result<(), BackendError> {
        match self {
            Sink::Handle { mut handle, .. } => {
                if flush {
                    handle.flush()?;
                }
                Ok(())
            }
            Sink::Upload(u) => u.commit(flush).map(|_| ()),
        }
    }

    fn discard(&mut self) {
        if let Sink::Handle { handle, .. } = self {
            handle.discard();
        }
    }
}

/// Writes exactly `length` bytes of the request body to `sink`, then flushes
/// when asked. The body is read with at most `timeout` between chunks; a body
/// that ends early or stalls is an error, and nothing is committed for a
/// file upload. Returns the bytes written. Returns only once the backend
/// thread has stopped, so the caller's locks cover every write. Each chunk
/// the backend accepts is added to `stats` as written.
pub async fn write_body(
    payload: &mut Payload,
    length: u64,
    sink: Sink,
    flush: bool,
    timeout: Duration,
    log: &mut OpLog,
    stats: Arc<TransferStats>,
) -> Result<u64, ApiError> {
    let (tx, mut rx) = mpsc::channel::<Msg>(DEPTH);
    let writer = spawn_blocking(move || {
        let mut sink = sink;
        let mut written = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(Msg::Data(b)) => {
                    if let Err(e) = sink.write(&b) {
                        sink.discard();
                        return (written, Err(e));
                    }
                    written += b.len() as u64;
                    stats.add_written(b.len() as u64);
                }
                Some(Msg::Finish) => return (written, sink.finish(flush)),
                None => {
                    sink.discard();
                    return (written, Err(BackendError::Io("upload aborted".into())));
                }
            }
        }
    });

    let mut received = 0u64;
    let mut buf = BytesMut::new();
    let mut client_error: Option<ApiError> = None;
    let mut writer_gone = false;
    while received < length {
        let chunk = match tokio::time::timeout(timeout, payload.next()).await {
            Err(_) => {
                client_error = Some(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("timed out waiting for the request body after {received} bytes"),
                ));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                log::info!("request body error after {received} bytes: {e}");
                break;
            }
            Ok(Some(Ok(c))) => c,
        };
        let take = chunk.len().min((length - received) as usize);
        if buf.capacity() == 0 {
            buf.reserve(CHUNK.min((length - received) as usize));
        }
        buf.extend_from_slice(&chunk[..take]);
        received += take as u64;
        if buf.len() >= CHUNK && tx.send(Msg::Data(buf.split().freeze())).await.is_err() {
            writer_gone = true;
            break;
        }
    }
    if client_error.is_none() && !writer_gone && received < length {
        client_error = Some(ApiError::bad_request(format!(
            "request body ended early at {received} bytes"
        )));
    }
    if client_error.is_none() && !writer_gone {
        if !buf.is_empty() && tx.send(Msg::Data(buf.split().freeze())).await.is_err() {
            writer_gone = true;
        }
        if !writer_gone {
            let _ = tx.send(Msg::Finish).await;
        }
    }
    drop(tx);
    let (written, result) = writer
        .await
        .unwrap_or_else(|_| (0, Err(BackendError::Io("writer thread panicked".into()))));
    log.bytes = written;
    if let Some(e) = client_error {
        return Err(e);
    }
    match result {
        Ok(()) => Ok(written),
        Err(e) => {
            log::error!("write error image_id={} err={e}", log.id);
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
        v[17] = 0;
        v[0] = 9;
        assert!(!is_zero(&v));
    }
}
